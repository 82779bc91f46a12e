"""`python -m mpcache.demo --private`: a language model answers a pass-key prompt through the private runtime.

    python -m mpcache.demo --private [--kv-cache mpcache --budget 64]          # starts the roles itself
    python -m mpcache.demo --private --length 512 --prefill-block 128           # prompt prefilled in 4 passes
    python -m mpcache.demo --private --parties party0:50702,party1:50712 --certs /certs --shutdown

Without --parties it starts the dealer and both parties as separate OS processes on loopback (mutual TLS with a
throw-away CA, as the launcher does) and party 0 secret-shares the checkpoint; with --parties it is the client of
a deployment already running (docker-compose's client service). Either way this process is the client: it
tokenizes the prompt, shares its one-hot rows, and alone reconstructs the generated tokens. It needs only the
model's config.json and tokenizer, never its weights. Prints the generated text, the expected answer, whether it
matches (exit 3 if not), the latency and the per-token cost. Every flag can be set as MPCACHE_<FLAG>. The prompt is
the shortest pass-key sample (no filler) by default, because a private prefill costs minutes per hundred tokens on
2 cores.
"""

from __future__ import annotations

import json
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mpcache.eval.runner import prompt_overhead, prompt_text
from mpcache.eval.tasks import TASKS, Sample, exact_match, make_sample
from mpcache.model.config import ModelConfig
from mpcache.model.loading import checkpoint_folder, load_tokenizer, model_config
from mpcache.model.tokenizer import Tokenizer
from mpcache.mpc.arith.accounting import summarize
from mpcache.mpc.deploy.launcher import Deployment
from parties.common import Credentials, Fatal, Parser, add_common_flags, run_main, setup_logging
from parties.jobs import check_prefill_block


def optional_int(text: str) -> int | None:
    """An int, or None for an empty string (MPCACHE_BUDGET= with --kv-cache full)."""
    return int(text) if text.strip() else None


def parse(argv: list[str] | None):
    p = Parser(prog="python -m mpcache.demo --private", description=__doc__.splitlines()[0])
    add_common_flags(p)
    p.add("--model", default="bundled", help="bundled, smollm2 or a folder with config.json and the tokenizer")
    p.add("--parties", default=None, help="client API addresses of a running party 0 and 1 (default: start them)")
    p.add("--shutdown", default=False, type=bool, help="with --parties: ask both parties to shut down afterwards")
    p.add("--task", default="passkey", choices=TASKS, help="task the prompt comes from (mpcache.eval.tasks)")
    p.add("--question", default="", help="ask this in the model's chat template instead of a task prompt")
    p.add("--check-plaintext", default=False, type=bool,
          help="without --parties: also decode greedily in plaintext (the client reads the weights) and compare")
    p.add("--json", default="", help="write the result (and, without --parties, each role's peak memory) here")
    p.add("--length", default=170, type=int, help="prompt length in tokens (the pass-key task needs > 169)")
    p.add("--seed", default=0, type=int, help="task sample seed")
    p.add("--max-new-tokens", default=7, type=int, help="fixed: the parties cannot see where the answer ends")
    p.add("--kv-cache", default="full", help="private KV cache: full, mpcache, streamingllm or h2o")
    p.add("--budget", default=None, type=optional_int, help="KV-cache budget, tokens per KV head (not for full)")
    p.add("--knobs", default="", help="KV-cache knobs as a JSON object (e.g. '{\"cluster_size\": 16}')")
    p.add("--prefill-block", default=None, type=optional_int,
          help="the parties prefill the prompt this many tokens at a time (default: all at once)")
    p.add("--comparisons", default="fss", choices=("fss", "crypten"),
          help="without --parties: the parties' secret comparisons (FSS keys, or CrypTen's adder for comparison)")
    p.add("--connect-timeout", default=300.0, type=float, help="seconds to wait for both parties to serve")
    p.add("--job-timeout", default=3000.0, type=float, help="seconds to wait for the generated tokens")
    p.add("--workdir", default=None, help="without --parties: certificates and logs (default: a temp dir)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error("--max-new-tokens must be >= 1")
    try:
        check_prefill_block(args.prefill_block)
    except ValueError as e:
        p.error(str(e))
    try:
        knobs = json.loads(args.knobs or "{}")
    except json.JSONDecodeError as e:
        p.error(f"--knobs must be a JSON object: {e}")
    if not isinstance(knobs, dict):
        p.error("--knobs must be a JSON object")
    if args.kv_cache == "full":
        if args.budget is not None or knobs:
            p.error("--kv-cache full takes no --budget or --knobs")
        args.spec = None
    else:
        if args.budget is None:
            p.error(f"--kv-cache {args.kv_cache} needs --budget")
        args.spec = {"method": args.kv_cache, "budget": args.budget, "knobs": knobs}
    if args.parties is not None:
        args.parties = [a.strip() for a in args.parties.split(",") if a.strip()]
        if len(args.parties) != 2:
            p.error(f"--parties needs 2 addresses (party 0, party 1), got {args.parties}")
        if args.check_plaintext:
            p.error("--check-plaintext needs the weights: only without --parties")
    return args


def cache_name(spec: dict | None) -> str:
    if spec is None:
        return "full"
    knobs = f", knobs {json.dumps(spec['knobs'])}" if spec["knobs"] else ""
    return f"{spec['method']} (budget {spec['budget']}{knobs})"


@dataclass
class Prompt:
    """What the client holds: the model's public config, its tokenizer, the task sample and the prompt's ids."""

    folder: Path
    config: ModelConfig
    tokenizer: Tokenizer
    sample: Sample
    ids: list[int]


def make_prompt(model: str, task: str, length: int, seed: int, question: str = "") -> Prompt:
    """The client's side: config.json and the tokenizer of `model` (a name or a folder; weights are not read) and a
    `task` prompt of about `length` tokens as the model reads it (in its chat template if it has one), or the
    `question` as the user's turn of a chat (no expected answer)."""
    folder = checkpoint_folder(model)
    config = model_config(folder)
    tokenizer = load_tokenizer(folder)
    if question:
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"model {model} has no chat template: ask with --task instead of --question")
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}])
        sample = Sample(task="question", prompt=text, answer="", context_len=0, depth=0.0, seed=seed)
        return Prompt(folder, config, tokenizer, sample, tokenizer.encode(text))
    count = lambda text: len(tokenizer.encode(text, add_bos=False))
    sample = make_sample(task, length, seed, count, reserve=prompt_overhead(tokenizer))
    return Prompt(folder, config, tokenizer, sample, tokenizer.encode(prompt_text(tokenizer, sample)))


def run(args) -> int:
    from parties.client import Client

    prompt = make_prompt(args.model, args.task, args.length, args.seed, args.question)
    folder, config, tokenizer, sample, ids = prompt.folder, prompt.config, prompt.tokenizer, prompt.sample, prompt.ids
    print(f"model: {args.model} ({config.family}, {config.n_layer} layers, d={config.d_model}), private: 2PC")
    print(f"task: {sample.task}, prompt {len(ids)} tokens; prompt ends: ..." + sample.prompt[-60:].replace("\n", " / "))
    blocks = f"blocks of {args.prefill_block} tokens" if args.prefill_block else "one pass"
    print(f"KV cache: {cache_name(args.spec)}; prefill: {blocks}", flush=True)
    dep = None
    if args.parties is None:
        work = Path(args.workdir or tempfile.mkdtemp(prefix="mpcache-private-demo-"))
        dep = Deployment(work, insecure=args.insecure, model=folder, timeout=120.0, party_timeout=120.0)
        print(f"roles: dealer, party 0 (model owner), party 1 on 127.0.0.1; logs in {work}", flush=True)
        args.certs, args.parties = str(dep.certs_dir("client")), [dep.address("api0"), dep.address("api1")]
    try:
        if dep is not None:
            for role in ("dealer", "party0", "party1"):
                dep.start(role, *(["--comparisons", args.comparisons] if role == "party0" else []))
        client = Client(args.parties, Credentials("client", args), connect_timeout=args.connect_timeout)
        t0 = time.perf_counter()
        tokens, _, results = client.generate(
            ids, config.vocab_size, args.max_new_tokens, timeout=args.job_timeout, kv_cache=args.spec,
            prefill_block=args.prefill_block,
        )  # fmt: skip
        latency = time.perf_counter() - t0
        memory = dep.peak_rss_mib() if dep is not None else {}
        if dep is not None or args.shutdown:
            client.shutdown("demo done", 60)
    finally:
        if dep is not None:
            dep.stop_all()
    reports = [json.loads(r.stats.report_json) for r in results]
    record = report(tokenizer.decode(tokens), sample.answer, tokens, latency, *reports)
    record.update(prompt_ids=ids, tokens=tokens, prefill_block=args.prefill_block, peak_rss_mib=memory)
    if memory:
        print("peak memory: " + ", ".join(f"{role} {mib:.0f} MiB" for role, mib in memory.items()))
    ok = exact_match(tokenizer.decode(tokens).split("\n")[0], sample.answer) if not args.question else True
    if args.check_plaintext:
        record["plaintext"] = compare_plaintext(folder, ids, tokens)
        ok = ok and record["plaintext"]["equal"]
    if args.json:
        command = "python -m mpcache.demo --private " + " ".join(shlex.quote(a) for a in args.argv)
        Path(args.json).write_text(json.dumps({"command": command, **record}, indent=1))
    return 0 if ok else 3


def compare_plaintext(folder: Path, ids: list[int], tokens: list[int]) -> dict:
    """The plaintext model's greedy tokens after the same prompt, and how many of the private ones agree."""
    from mpcache.model.loading import load_model
    from mpcache.mpc.nn.decoder import plain_greedy

    model, tokenizer = load_model(folder)
    want, _ = plain_greedy(model, torch.tensor([ids]), len(tokens))
    same = next((i for i, (a, b) in enumerate(zip(tokens, want)) if a != b), len(tokens))
    print(f"plaintext:  {tokenizer.decode(want)!r}")
    print(f"agreement:  the first {same} of {len(tokens)} private tokens equal plaintext's greedy tokens")
    return {"tokens": want, "equal": want == tokens, "leading_equal": same}


def report(text: str, expected: str, tokens: list[int], latency: float, party0: dict, party1: dict) -> dict:
    """What the client learned (text) and what the run cost (party 0's per-step report; party 1's is the same but
    for the dealer's traffic: party 0 also gets every Beaver-style correction)."""
    answer = text.split("\n")[0]
    steps = party0["steps"]
    decode = steps[1:]
    print(f"generated:  {text!r}")
    print(f"model says: {answer.strip()}")
    if expected:
        print(f"expected:   {expected}")
        print(f"match:      {'yes' if exact_match(answer, expected) else 'no'}")
    print(f"latency:    {latency:.1f} s for {len(tokens)} tokens: prefill {steps[0]['seconds']:.1f} s, decode "
          f"{sum(s['seconds'] for s in decode) / max(len(decode), 1):.1f} s per token")  # fmt: skip
    print(f"traffic:    prefill {steps[0]['bytes'] / 2**20:.1f} MiB in {steps[0]['rounds']} rounds, decode "
          f"{steps[-1]['bytes'] / 2**20:.1f} MiB in {steps[-1]['rounds']} rounds per party per token")  # fmt: skip
    dealer = [(p["steps"][0]["dealer_bytes"] / 2**20, p["steps"][-1]["dealer_bytes"] / 2**20) for p in (party0, party1)]
    print(f"dealer:     prefill {dealer[0][0]:.1f} / {dealer[1][0]:.1f} MiB, decode {dealer[0][1]:.1f} / "
          f"{dealer[1][1]:.1f} MiB per token to party 0 / party 1")  # fmt: skip
    by_op = summarize(steps[-1:])
    print("last decode step by operation: " + ", ".join(
        f"{op} {v['bytes'] / 2**20:.2f} MiB/{int(v['rounds'])} rounds/{v['dealer_bytes'] / 2**20:.2f} dealer MiB/"
        f"{v['seconds']:.2f} s" for op, v in by_op.items()
    ))  # fmt: skip
    record = {
        "text": text,
        "expected": expected,
        "match": exact_match(answer, expected),
        "latency_s": round(latency, 3),
        "prefill_s": round(steps[0]["seconds"], 3),
        "decode_s_per_token": round(sum(s["seconds"] for s in decode) / max(len(decode), 1), 3),
        "decode_bytes_per_token": steps[-1]["bytes"],
        "decode_rounds_per_token": steps[-1]["rounds"],
        "dealer_bytes": {"prefill": [p["steps"][0]["dealer_bytes"] for p in (party0, party1)],
                         "decode_per_token": [p["steps"][-1]["dealer_bytes"] for p in (party0, party1)]},
    }  # fmt: skip
    print("RESULT " + json.dumps(record), flush=True)
    return record


def main(argv: list[str] | None = None) -> int:
    def demo(argv: list[str] | None) -> int:
        args = parse(argv)
        args.argv = list(argv or [])
        setup_logging("client", args.session, args.log_level)
        torch.set_num_threads(1)
        try:
            return run(args)
        except (ValueError, FileNotFoundError) as e:
            raise Fatal(str(e), code=2) from None

    argv = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--private"]  # the flag that chose this demo
    return run_main("demo", demo, argv)
