"""`python -m mpcache.demo --private`: the bundled model answers a pass-key prompt through the private runtime.

Starts the dealer and both parties as separate OS processes on loopback (mutual TLS with a throw-away CA, as
the launcher does); party 0 secret-shares the bundled checkpoint; this process is the client: it tokenizes the
prompt, shares its one-hot rows, and alone reconstructs the generated tokens. Prints the answer, whether it
matches, the latency and the per-step communication. The prompt is the shortest pass-key sample (no filler),
because a private prefill costs minutes per hundred tokens on 2 cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from mpcache.eval.tasks import exact_match, make_sample
from mpcache.model.loading import BUNDLED_DIR, load_bundled
from mpcache.mpc.arith.accounting import summarize
from mpcache.mpc.deploy.launcher import Deployment


def run(length: int, seed: int, max_new_tokens: int, workdir: str | None = None, insecure: bool = False) -> int:
    import json

    from parties.client import Client
    from parties.common import Credentials

    model, tokenizer = load_bundled()
    sample = make_sample("passkey", length, seed, lambda text: len(tokenizer.encode(text, add_bos=False)))
    ids = tokenizer.encode(sample.prompt)
    print(f"model: bundled {model.config.family}, {model.num_parameters() / 1e6:.1f}M parameters (private: 2PC)")
    print(f"task: passkey, prompt {len(ids)} tokens; prompt ends: ..." + sample.prompt[-60:].replace("\n", " / "))
    work = Path(workdir or tempfile.mkdtemp(prefix="mpcache-private-demo-"))
    dep = Deployment(work, insecure=insecure, model=BUNDLED_DIR, timeout=120.0, party_timeout=120.0)
    print(f"roles: dealer, party 0 (model owner), party 1 on 127.0.0.1; logs in {work}", flush=True)
    try:
        for role in ("dealer", "party0", "party1"):
            dep.start(role)
        creds = Credentials(
            "client",
            argparse.Namespace(insecure=insecure, certs=str(work / "certs"), tls_ca=None, tls_cert=None, tls_key=None),
        )
        client = Client([dep.address("api0"), dep.address("api1")], creds, connect_timeout=300)
        t0 = time.perf_counter()
        tokens, _, results = client.generate(ids, model.config.vocab_size, max_new_tokens, timeout=3000)
        latency = time.perf_counter() - t0
        client.shutdown("demo done", 60)
    finally:
        dep.stop_all()
    text = tokenizer.decode(tokens)
    answer = text.split("\n")[0]
    steps = json.loads(results[0].stats.report_json)["steps"]
    print(f"model says: {answer.strip()}")
    print(f"expected:   {sample.answer}")
    print(f"match:      {'yes' if exact_match(answer, sample.answer) else 'no'}")
    print(f"latency:    {latency:.1f} s for {len(tokens)} tokens: prefill {steps[0]['seconds']:.1f} s, decode "
          f"{sum(s['seconds'] for s in steps[1:]) / max(len(steps) - 1, 1):.1f} s per token")  # fmt: skip
    print(f"traffic:    prefill {steps[0]['bytes'] / 2**20:.1f} MiB in {steps[0]['rounds']} rounds, decode "
          f"{steps[-1]['bytes'] / 2**20:.1f} MiB in {steps[-1]['rounds']} rounds per party per token")  # fmt: skip
    by_op = summarize(steps[-1:])
    print("last decode step by operation: " + ", ".join(
        f"{op} {v['bytes'] / 2**20:.2f} MiB/{int(v['rounds'])} rounds/{v['seconds']:.2f} s" for op, v in by_op.items()
    ))  # fmt: skip
    return 0 if exact_match(answer, sample.answer) else 3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mpcache.demo --private", description=__doc__.splitlines()[0])
    p.add_argument("--private", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--length", type=int, default=170, help="prompt length in tokens (the pass-key task needs > 169)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=7, help="fixed: the parties cannot see where the answer ends")
    p.add_argument("--workdir", default=None, help="certificates and logs (default: a temp dir)")
    p.add_argument("--insecure", action="store_true", help="plaintext gRPC instead of mutual TLS")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    try:
        return run(args.length, args.seed, args.max_new_tokens, args.workdir, args.insecure)
    except (ValueError, FileNotFoundError) as e:
        p.error(str(e))
    return 2
