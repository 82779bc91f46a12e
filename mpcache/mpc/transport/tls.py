"""Mutual TLS for every role (dealer, party0, party1, client), plus a development CA.

Identity is the role name, not the host name: each certificate carries its role as common name and as its only
DNS subject-alternative name, and every channel pins the role it expects to reach (`ssl_target_name_override`),
so the same certificates work on loopback, in docker-compose (where service names are the role names) and
across machines, and a party's certificate cannot impersonate the dealer even though one CA signed both.
Servers require client certificates and read the caller's role from the handshake (`peer_role`).

    python -m mpcache.mpc.transport.tls --out certs          # or the console script `mpcache-certs`
    mpcache-certs --out pki --per-role                        # pki/ca (CA key), pki/<role>: one per role
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc

ROLES = ("dealer", "party0", "party1", "client")


class TlsError(ValueError):
    """Unusable TLS material (missing or unreadable file); the message names the file and the fix."""


@dataclass(frozen=True)
class TlsFiles:
    """PEM paths of one role: the CA that signs every role, and this role's certificate and key."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def in_dir(cls, directory: str | Path, role: str) -> TlsFiles:
        """The layout written by `make_dev_pki`: ca.pem, <role>.pem, <role>.key."""
        d = Path(directory)
        return cls(ca=d / "ca.pem", cert=d / f"{role}.pem", key=d / f"{role}.key")

    def read(self) -> tuple[bytes, bytes, bytes]:
        out = []
        for what, path in (("CA certificate", self.ca), ("certificate", self.cert), ("private key", self.key)):
            try:
                out.append(Path(path).read_bytes())
            except FileNotFoundError:
                raise TlsError(
                    f"TLS {what} not found: {path} (create development certificates with "
                    f"`mpcache-certs --out {Path(path).parent}`, or run with --insecure)"
                ) from None
            except OSError as e:
                raise TlsError(f"cannot read TLS {what} {path}: {e.strerror}") from None
        return out[0], out[1], out[2]


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server side of mutual TLS: present our certificate and reject callers without a CA-signed one."""
    ca, cert, key = files.read()
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client side of mutual TLS: trust only our CA and present our own certificate."""
    ca, cert, key = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(expected_role: str) -> list[tuple[str, str]]:
    """Pin the server's identity to a role name instead of the dialled host name."""
    if expected_role not in ROLES:
        raise ValueError(f"unknown role {expected_role!r}; expected one of {ROLES}")
    return [("grpc.ssl_target_name_override", expected_role)]


def peer_role(context: grpc.ServicerContext) -> str | None:
    """The role (certificate common name) of the authenticated caller, or None on a plaintext connection."""
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else None


def make_dev_pki(out: str | Path, roles: tuple[str, ...] = ROLES, days: int = 30) -> list[Path]:
    """Write a throw-away CA and one certificate per role into `out`; returns the written paths.

    Development only: the CA key sits next to the certificates. Keys are EC P-256 (fast to make, small).
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    for role in roles:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}; expected one of {ROLES}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    valid_from, valid_to = now - dt.timedelta(minutes=5), now + dt.timedelta(days=days)

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "mpcache dev"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        )

    def key_pem(key) -> bytes:
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    written = []

    def write(path: Path, data: bytes, private: bool = False) -> None:
        path.write_bytes(data)
        if private:
            path.chmod(0o600)
        written.append(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(name("mpcache dev CA"))
        .issuer_name(name("mpcache dev CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid_from)
        .not_valid_after(valid_to)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    write(out / "ca.key", key_pem(ca_key), private=True)

    for role in roles:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name(role))
            .issuer_name(ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(valid_from)
            .not_valid_after(valid_to)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(role)]), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .sign(ca_key, hashes.SHA256())
        )
        write(out / f"{role}.pem", cert.public_bytes(serialization.Encoding.PEM))
        write(out / f"{role}.key", key_pem(key), private=True)
    return written


def make_role_dirs(out: str | Path, roles: tuple[str, ...] = ROLES, days: int = 30) -> list[Path]:
    """A development CA in `out`/ca (its key stays there) and one directory `out`/<role> per role holding only what
    that role needs: ca.pem, <role>.pem and <role>.key (one volume per role in docker-compose.yml)."""
    out = Path(out)
    make_dev_pki(out / "ca", roles, days)
    written = [out / "ca" / "ca.pem", out / "ca" / "ca.key"]
    for role in roles:
        directory = out / role
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out / "ca" / "ca.pem", directory / "ca.pem")
        for name in (f"{role}.pem", f"{role}.key"):
            shutil.move(out / "ca" / name, directory / name)  # copy2 + unlink across volumes: the 0600 mode stays
        written += [directory / n for n in ("ca.pem", f"{role}.pem", f"{role}.key")]
    return written


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="mpcache-certs", description="Create a development CA and role certificates.")
    p.add_argument("--out", default="certs", help="output directory (default: certs)")
    p.add_argument("--days", type=int, default=30, help="validity in days (default: 30)")
    p.add_argument("--force", action="store_true", help="overwrite an existing ca.pem")
    p.add_argument("--per-role", action="store_true", help="CA in OUT/ca, each role's files alone in OUT/<role>")
    args = p.parse_args(argv)
    out = Path(args.out)
    ca = out / "ca" / "ca.pem" if args.per_role else out / "ca.pem"
    if ca.exists() and not args.force:
        print(f"mpcache-certs: {ca} exists; keeping it (use --force to replace)")
        return 0
    for path in (make_role_dirs if args.per_role else make_dev_pki)(out, days=args.days):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
