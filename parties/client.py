"""`client`: secret-share an input, have both parties run a private job on it, reconstruct and print the answer.

    client --parties party0:50702,party1:50712 --job linear_relu --input '[0.5, -1, 2, 0, 1, 1, -2, 0.25]'

Neither party sees the input or the answer: party 0 receives enc(x) - r and party 1 receives r for a uniformly
random r (mod 2^64); each returns a share of the output and only the client adds them. The last stdout line is
`RESULT <json>` with the answer, latency and per-party communication, for scripts.

    client --job generate --prompt 'The pass key is 123. ... What is the pass key?' --params '{"max_new_tokens": 8}'

runs the private decoder: the client tokenizes the prompt (--tokenizer: a checkpoint folder, default the bundled
model's), secret-shares its one-hot rows and adds the parties' shares of the generated one-hots; only it learns the
tokens. --prefill-block N has the parties prefill the prompt N tokens at a time (job parameter "prefill_block":
bounded memory for long prompts). --report PATH writes both parties' per-step, per-layer, per-operation costs as
JSON.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

import grpc
import torch

from mpcache.mpc.dealer import tuples
from mpcache.mpc.transport import wire
from mpcache.mpc.transport.proto import mpcache_pb2 as pb
from mpcache.mpc.transport.proto import mpcache_pb2_grpc as pb_grpc
from parties import jobs
from parties.common import Credentials, Fatal, Parser, add_common_flags, parse_json, run_main, setup_logging

log = logging.getLogger("mpcache.client")
PRECISION_BITS = 16  # CrypTen's default fixed-point precision (cfg.encoder.precision_bits)
GRPC_OPTIONS = [("grpc.max_send_message_length", 256 << 20), ("grpc.max_receive_message_length", 256 << 20)]


def parse(argv: list[str] | None):
    p = Parser(prog="client", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add("--parties", default="127.0.0.1:50702,127.0.0.1:50712", help="client API addresses of party 0 and 1")
    p.add("--job", default="linear_relu", help="job kind (see parties/jobs.py)")
    p.add("--input", default="[0.5, -1.0, 2.0, 0.0, 1.0, 1.0, -2.0, 0.25]", help="input as a JSON (nested) list")
    p.add("--input-file", default=None, help="read the input JSON from this file instead of --input")
    p.add("--params", default="{}", help="public job parameters as a JSON object")
    p.add("--timeout", default=120.0, type=float, help="seconds to wait for the answer")
    p.add("--connect-timeout", default=60.0, type=float, help="seconds to wait for both parties to be ready")
    p.add("--shutdown", default=False, type=bool, help="ask both parties to shut down afterwards")
    p.add("--prompt", default=None, help="generate: the prompt text (tokenized here, shared as one-hot rows)")
    p.add("--prompt-file", default=None, help="generate: read the prompt from this file")
    p.add("--tokenizer", default=None, help="generate: checkpoint folder of the tokenizer (default: bundled model)")
    p.add("--report", default=None, help="generate: write the parties' cost reports (JSON) to this file")
    p.add("--prefill-block", default=None, type=int,
          help="generate: the parties prefill the prompt this many tokens at a time (default: all at once)")
    args = p.parse_args(argv)
    args.parties = [a.strip() for a in args.parties.split(",") if a.strip()]
    if len(args.parties) != 2:
        p.error(f"--parties needs 2 addresses (party 0, party 1), got {args.parties}")
    try:
        args.params = parse_json(args.params, "--params")
    except ValueError as e:
        p.error(str(e))
    if not isinstance(args.params, dict):
        p.error("--params must be a JSON object")
    if args.job == "generate":
        try:
            args.prompt = Path(args.prompt_file).read_text(encoding="utf-8") if args.prompt_file else args.prompt
            args.prompt and args.prompt.encode("utf-8")  # a command-line argument may hold undecodable bytes
        except OSError as e:
            p.error(f"cannot read --prompt-file: {e}")
        except UnicodeError:
            p.error("the prompt is not valid UTF-8 text")
        if not args.prompt:
            p.error("--job generate needs --prompt or --prompt-file")
        if args.prefill_block is not None:
            if "prefill_block" in args.params:
                p.error("give the prefill block once: --prefill-block or prefill_block in --params")
            args.params["prefill_block"] = args.prefill_block
        try:
            jobs.check_prefill_block(args.params.get("prefill_block"))
        except ValueError as e:
            p.error(str(e))
        return args
    try:
        text = Path(args.input_file).read_text(encoding="utf-8") if args.input_file else args.input
        args.x = torch.tensor(parse_json(text, "the input", max_bytes=None, max_depth=32), dtype=torch.float64)
    except OSError as e:
        p.error(f"cannot read --input-file: {e}")
    except (UnicodeError, TypeError, ValueError, RuntimeError) as e:
        p.error(f"the input must be a JSON (nested) list of numbers: {e}")
    try:
        jobs.client_check(args.job, args.x, args.params)
    except ValueError as e:
        p.error(f"{args.job}: {e}")
    return args


def share(x: torch.Tensor, bits: int = PRECISION_BITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed-point encode x and split it into two additive shares mod 2^64 (r from the OS's CSPRNG)."""
    limit = 2.0 ** (62 - bits)
    if not torch.isfinite(x).all() or (x.numel() and x.abs().max() >= limit):
        raise Fatal(f"inputs must be finite with |x| < 2^{62 - bits} to fit the fixed-point encoding")
    encoded = torch.round(x * (1 << bits)).to(torch.int64)
    r = torch.frombuffer(bytearray(os.urandom(8 * encoded.numel())), dtype=torch.int64).reshape(encoded.shape)
    return encoded - r, r


def reconstruct(shares: list[torch.Tensor], bits: int) -> torch.Tensor:
    """Add the shares (int64 wraps mod 2^64) and decode the fixed-point value."""
    total = shares[0].clone()
    for s in shares[1:]:
        total += s
    return total.to(torch.float64) / (1 << bits)


class Client:
    def __init__(self, addresses: list[str], creds: Credentials, connect_timeout: float) -> None:
        self.addresses = addresses
        self.channels = [creds.channel_to(a, f"party{i}", GRPC_OPTIONS) for i, a in enumerate(addresses)]
        self.stubs = [pb_grpc.JobsStub(c) for c in self.channels]
        self._wait_ready(connect_timeout)

    def _wait_ready(self, timeout: float) -> None:
        """Both parties answer health checks as SERVING once they have joined the dealer and each other."""
        deadline = time.monotonic() + timeout
        for i, channel in enumerate(self.channels):
            health = pb_grpc.HealthStub(channel)
            last = "it did not answer"
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise Fatal(f"party {i} at {self.addresses[i]} not ready within {timeout:g} s ({last})")
                try:
                    reply = health.Check(pb.HealthRequest(), timeout=min(left, 5.0), wait_for_ready=True)
                    if reply.status == pb.HealthResponse.SERVING:
                        break
                    last = f"NOT_SERVING: {reply.reason}" if reply.reason else "NOT_SERVING"
                except grpc.RpcError as e:
                    if e.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                        raise Fatal(
                            f"party {i} at {self.addresses[i]} refused the health check: {e.details()}"
                        ) from None
                time.sleep(0.2)
            log.info("step=ready party %d at %s is serving", i, self.addresses[i])

    def _both(self, what: str, calls, timeout: float) -> list:
        """Issue both parties' calls at once; the first failure (in party order) is reported and the rest cancelled."""
        pending = [call() for call in calls]  # grpc futures
        try:
            results = []
            for i, f in enumerate(pending):
                try:
                    results.append(f.result())
                except grpc.RpcError as e:
                    code = e.code()
                    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                        raise Fatal(
                            f"party {i} at {self.addresses[i]} did not answer {what} within {timeout:g} s"
                        ) from None
                    raise Fatal(f"party {i} at {self.addresses[i]} failed {what}: {code.name}: {e.details()}") from None
            return results
        finally:
            for f in pending:
                f.cancel()

    def run(self, kind: str, x: torch.Tensor, params: dict, timeout: float) -> tuple[torch.Tensor, list[pb.JobResult]]:
        outs, results = self.run_all(kind, x, params, timeout)
        if len(outs) != 1:
            raise Fatal(f"job {kind} returned {len(outs)} outputs; this client prints exactly one")
        return outs[0], results

    def run_all(
        self,
        kind: str,
        x: torch.Tensor,
        params: dict,
        timeout: float,
        bits: int = PRECISION_BITS,
        job_id: str | None = None,
    ) -> tuple[list[torch.Tensor], list[pb.JobResult]]:
        """Share x with `bits` fractional bits, run job `kind` (`job_id`: default a fresh random id), reconstruct
        every output."""
        job_id = job_id or uuid.uuid4().hex[:12]
        s0, s1 = share(x, bits)
        requests = [
            pb.JobRequest(
                job_id=job_id,
                party=i,
                kind=kind,
                inputs=[pb.FixedPointShare(precision_bits=bits, share=wire.tensor_to_proto(s))],
                params_json=json.dumps(params),
            )
            for i, s in enumerate((s0, s1))
        ]
        log.info("step=submit job %s (%s) on input of shape %s", job_id, kind, list(x.shape))
        calls = [lambda i=i: self.stubs[i].Run.future(requests[i], timeout=timeout) for i in range(2)]
        results = self._both(f"job {job_id}", calls, timeout)
        outs = []
        for k in range(len(results[0].outputs)):
            parts = [r.outputs[k] for r in results]
            if len({p.precision_bits for p in parts}) != 1:
                raise Fatal(f"the parties returned output {k} with different precisions")
            outs.append(reconstruct([tuples.int64_from_pb(p.share) for p in parts], parts[0].precision_bits))
        return outs, results

    def generate(
        self,
        ids: list[int],
        vocab_size: int,
        max_new_tokens: int,
        timeout: float,
        return_logits: bool = False,
        kv_cache: dict | None = None,
        params: dict | None = None,
        prefill_block: int | None = None,
    ) -> tuple[list[int], torch.Tensor | None, list[pb.JobResult]]:
        """The private decoder: greedy tokens after prompt `ids` (and the first step's logits if asked); kv_cache:
        the parties' KV-cache policy, e.g. {"method": "mpcache", "budget": 64} (public); prefill_block: prompt
        tokens per prefill pass (public; None: one pass); `params`: any other job parameters, passed on as they
        are (the parties refuse unknown ones by name)."""
        from mpcache.mpc.nn.layers import one_hot

        x = one_hot(torch.tensor([ids]), vocab_size)
        params = {**(params or {}), "max_new_tokens": max_new_tokens, "return_logits": return_logits}
        if kv_cache is not None:
            params["kv_cache"] = kv_cache
        if prefill_block is not None:
            params["prefill_block"] = prefill_block
        outs, results = self.run_all("generate", x, params, timeout, bits=0)
        tokens = outs[0][0].argmax(-1).tolist()
        return tokens, (outs[1] if return_logits else None), results

    def generate_client_argmax(
        self, ids: list[int], vocab_size: int, max_new_tokens: int, timeout: float, cache: str = "client-argmax"
    ) -> tuple[list[int], list[list[pb.JobResult]]]:
        """Greedy decoding where this client takes each argmax from the logits the parties return (job generate's
        output "logits"; parties/jobs.py states what that reveals): one job per token, the parties' KV cache kept
        between them under the name `cache` and dropped after the last. Returns the tokens and every job's results."""
        from mpcache.mpc.nn.layers import one_hot

        tokens, results = [], []
        x = one_hot(torch.tensor([ids]), vocab_size)
        for step in range(max_new_tokens):
            params: dict = {"max_new_tokens": 1, "output": "logits"}
            if step + 1 < max_new_tokens:
                params["keep_cache"] = cache
            if step:
                params["resume"] = cache
            outs, res = self.run_all("generate", x, params, timeout, bits=0)
            tokens.append(int(outs[0][0, -1].argmax()))
            results.append(res)
            x = one_hot(torch.tensor([[tokens[-1]]]), vocab_size)
        return tokens, results

    def shutdown(self, reason: str, timeout: float) -> None:
        request = pb.ShutdownRequest(reason=reason, request_id=uuid.uuid4().hex[:12])
        calls = [lambda i=i: self.stubs[i].Shutdown.future(request, timeout=timeout) for i in range(2)]
        self._both("shutdown", calls, timeout)

    def status(self, job_id: str, timeout: float = 10.0) -> list[pb.StatusResponse]:
        """Each party's view of a job (QUEUED, RUNNING, DONE, CANCELLED or FAILED)."""
        calls = [lambda i=i: self.stubs[i].Status.future(pb.StatusRequest(request_id=job_id), timeout=timeout)
                 for i in range(2)]  # fmt: skip
        return self._both(f"status of job {job_id}", calls, timeout)

    def cancel(self, job_id: str, timeout: float = 10.0) -> list[pb.CancelResponse]:
        """Stop a job at both parties (a waiting one at once, a running one at its next checkpoint)."""
        calls = [lambda i=i: self.stubs[i].Cancel.future(pb.CancelRequest(request_id=job_id), timeout=timeout)
                 for i in range(2)]  # fmt: skip
        return self._both(f"cancel of job {job_id}", calls, timeout)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    setup_logging("client", args.session, args.log_level)
    creds = Credentials("client", args)
    client = Client(args.parties, creds, args.connect_timeout)
    if args.job == "generate":
        return _generate(client, args)
    t0 = time.perf_counter()
    y, results = client.run(args.job, args.x, args.params, args.timeout)
    latency = time.perf_counter() - t0
    if args.shutdown:
        client.shutdown("client done", args.timeout)
    per_party = [
        {
            "party": i,
            "mpc_s": round(r.stats.elapsed_s, 4),
            "rounds": r.stats.rounds,
            "bytes": r.stats.bytes,
            "dealer_bytes": r.stats.dealer_bytes,
            "tuples": r.stats.tuples,
        }
        for i, r in enumerate(results)
    ]
    print(f"answer: {[round(v, 4) for v in y.flatten().tolist()]} (shape {list(y.shape)})")
    print(f"latency: {latency:.3f} s (client submit -> both shares back)")
    for p in per_party:
        print(
            f"party {p['party']}: {p['rounds']} rounds, {p['bytes']} bytes party<->party (CrypTen counter), "
            f"{p['dealer_bytes']} bytes from the dealer, {p['tuples']} tuples, {p['mpc_s']} s MPC"
        )
    record = {"job": args.job, "answer": y.tolist(), "latency_s": round(latency, 4), "parties": per_party}
    print("RESULT " + json.dumps(record), flush=True)
    return 0


def _generate(client: Client, args) -> int:
    from mpcache.model.config import ModelConfig
    from mpcache.model.loading import BUNDLED_DIR, config_from_hf, is_mpcache_config, load_tokenizer, read_config

    folder = Path(args.tokenizer or BUNDLED_DIR)
    raw = read_config(folder)
    config = ModelConfig.from_dict(raw) if is_mpcache_config(raw) else config_from_hf(raw)
    tokenizer = load_tokenizer(folder)
    params = dict(args.params)
    ids = tokenizer.encode(args.prompt)
    t0 = time.perf_counter()
    steps = params.pop("max_new_tokens", 16)
    tokens, _, results = client.generate(ids, config.vocab_size, steps, args.timeout, params=params)
    latency = time.perf_counter() - t0
    if args.shutdown:
        client.shutdown("client done", args.timeout)
    text = tokenizer.decode(tokens)
    reports = [json.loads(r.stats.report_json or "{}") for r in results]
    if args.report:
        Path(args.report).write_text(json.dumps({"parties": reports}, indent=1))
    print(f"prompt: {len(ids)} tokens (shared as one-hot rows; neither party saw them)")
    print(f"generated: {text!r}")
    print(f"latency: {latency:.3f} s for {len(tokens)} tokens (prefill included)")
    for i, r in enumerate(results):
        print(f"party {i}: {r.stats.rounds} rounds, {r.stats.bytes} bytes party<->party, {r.stats.elapsed_s:.2f} s MPC")
    steps = reports[0].get("steps", [])
    record = {
        "job": "generate",
        "prompt_tokens": len(ids),
        "prefill_block": params.get("prefill_block"),
        "tokens": tokens,
        "text": text,
        "latency_s": round(latency, 4),
        "steps": [{k: s[k] for k in ("name", "rounds", "bytes", "seconds")} for s in steps],
    }
    print("RESULT " + json.dumps(record), flush=True)
    return 0


def cli() -> None:
    sys.exit(run_main("client", main))


if __name__ == "__main__":
    cli()
