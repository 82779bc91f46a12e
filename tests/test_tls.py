"""Mutual TLS: the development CA, role-pinned channels, and the communicator's caller check."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mpcache.mpc.transport import tls

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    d = tmp_path_factory.mktemp("certs")
    tls.make_dev_pki(d)
    return d


def test_dev_pki_signs_one_certificate_per_role(certs):
    ca = x509.load_pem_x509_certificate((certs / "ca.pem").read_bytes())
    for role in tls.ROLES:
        cert = x509.load_pem_x509_certificate((certs / f"{role}.pem").read_bytes())
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == role
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [role]
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
        assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= set(eku)
        ca.public_key().verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        assert (certs / f"{role}.key").stat().st_mode & 0o077 == 0  # private keys are not world-readable


def _echo_server(credentials):
    def echo(request, context):
        return request + b"|" + (tls.peer_role(context) or "plaintext").encode()

    handler = grpc.method_handlers_generic_handler("t.T", {"Echo": grpc.unary_unary_rpc_method_handler(echo)})
    server = grpc.server(futures.ThreadPoolExecutor(2))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_secure_port("127.0.0.1:0", credentials)
    server.start()
    return server, port


def _call(port, credentials, expected_role):
    channel = grpc.secure_channel(f"127.0.0.1:{port}", credentials, options=tls.channel_options(expected_role))
    try:
        return channel.unary_unary("/t.T/Echo")(b"hi", timeout=5)
    finally:
        channel.close()


def test_channels_pin_the_server_role_and_servers_see_the_caller_role(certs, tmp_path):
    server, port = _echo_server(tls.server_credentials(tls.TlsFiles.in_dir(certs, "dealer")))
    try:
        party0 = tls.channel_credentials(tls.TlsFiles.in_dir(certs, "party0"))
        assert _call(port, party0, "dealer") == b"hi|party0"
        with pytest.raises(grpc.RpcError) as e:  # a server with the dealer's certificate is not party 1
            _call(port, party0, "party1")
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE
        tls.make_dev_pki(tmp_path / "other")  # same role names, another CA: refused both ways
        with pytest.raises(grpc.RpcError):
            _call(port, tls.channel_credentials(tls.TlsFiles.in_dir(tmp_path / "other", "party0")), "dealer")
        plain = grpc.insecure_channel(f"127.0.0.1:{port}")
        with pytest.raises(grpc.RpcError):
            plain.unary_unary("/t.T/Echo")(b"hi", timeout=5)
        plain.close()
    finally:
        server.stop(None)
    with pytest.raises(ValueError, match="unknown role"):
        tls.channel_options("mallory")


def test_missing_file_is_a_tls_error_naming_it_and_the_fix(tmp_path):
    with pytest.raises(tls.TlsError, match=rf"not found: {tmp_path}/ca.pem.*mpcache-certs --out {tmp_path}"):
        tls.TlsFiles.in_dir(tmp_path, "party0").read()


@pytest.mark.timeout(120)
def test_missing_certificate_is_reported_in_one_line_by_every_role(tmp_path):
    for module, extra in (("parties.dealer", []), ("parties.party", ["--rank", "1"]), ("parties.client", [])):
        proc = subprocess.run(
            [sys.executable, "-m", module, "--certs", str(tmp_path / "nope"), *extra],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 1, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert "error: TLS CA certificate not found" in lines[0] and "--insecure" in lines[0]


@pytest.mark.timeout(120)
def test_mpcache_certs_cli_keeps_an_existing_ca(tmp_path):
    run = [sys.executable, "-m", "mpcache.mpc.transport.tls", "--out", str(tmp_path)]
    subprocess.run(run, check=True, capture_output=True, timeout=60)
    before = (tmp_path / "ca.pem").read_bytes()
    out = subprocess.run(run, check=True, capture_output=True, text=True, timeout=60).stdout
    assert "keeping it" in out and (tmp_path / "ca.pem").read_bytes() == before


@pytest.mark.timeout(60)
def test_communicator_rejects_a_peer_whose_certificate_names_another_rank(certs):
    from mpcache.mpc.transport import grpc_comm

    with socket.socket() as s0, socket.socket() as s1:
        s0.bind(("127.0.0.1", 0)), s1.bind(("127.0.0.1", 0))
        peers = (f"127.0.0.1:{s0.getsockname()[1]}", f"127.0.0.1:{s1.getsockname()[1]}")

    def config(rank, role):
        return grpc_comm.PartyConfig(
            rank, 2, peers, "tls-test", timeout_s=5, connect_timeout_s=5, tls_files=tls.TlsFiles.in_dir(certs, role)
        )

    results = {}

    def start(rank, role):
        try:
            results[rank] = grpc_comm.GrpcCommunicator(config(rank, role))
        except Exception as e:  # noqa: BLE001 - the test inspects it
            results[rank] = e

    # Rank 1 holds party 0's certificate: it can serve as nobody but party 0 and must not pass as rank 1.
    threads = [threading.Thread(target=start, args=(0, "party0")), threading.Thread(target=start, args=(1, "party0"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    try:
        assert isinstance(results[1], grpc_comm.CommError) and "PERMISSION_DENIED" in str(results[1])
        assert "claimed rank 1" in str(results[1])
        assert isinstance(results[0], grpc_comm.CommError)  # rank 0 finds no genuine party 1 either
    finally:
        for r in results.values():
            if isinstance(r, grpc_comm.GrpcCommunicator):
                r._stop(grace=0)
