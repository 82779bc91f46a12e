"""Plaintext demo: the bundled model reads a long prompt and answers from a fact hidden in it.

    python -m mpcache.demo                               # passkey at 512 tokens, full KV cache
    python -m mpcache.demo --task niah --length 2048 --method snapkv --budget 128
    python -m mpcache.demo --model smollm2 --task stdlib_docs --length 2048   # SmolLM2-135M-Instruct
    python -m mpcache.demo --private                     # the same model in 2PC (mpcache/mpc/deploy/private_demo.py)
    python -m mpcache.demo --private --prefill-block 64  # ... its prompt prefilled 64 tokens at a time

Streams the generated text as it is decoded, then prints the expected answer, whether it
matched, the prefill and decode speeds and the size of the KV cache it decoded with.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from mpcache.eval.runner import (
    budget_tokens,
    full_cache_bytes,
    parse_budget,
    prompt_overhead,
    prompt_text,
    recording_factory,
    resolve_policy,
    row_cache_sizes,
)
from mpcache.eval.tasks import TASKS, exact_match, make_sample
from mpcache.generate import stream_generate
from mpcache.model.loading import BUNDLED_DIR, load_bundled, load_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mpcache.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="bundled", help="bundled (default), smollm2, a checkpoint folder or .gguf")
    parser.add_argument("--task", choices=TASKS, default="passkey")
    parser.add_argument("--length", type=int, default=512, help="prompt length in tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--depth", type=float, default=None, help="where the fact sits (0 = start, 1 = end)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="stops earlier at the end of the answer line")
    parser.add_argument("--method", default="full", help="KV-cache method (see mpcache.methods)")
    parser.add_argument("--budget", type=parse_budget, default=None, help="tokens (128) or prompt fraction (0.25)")
    args = parser.parse_args(argv)
    if args.max_new_tokens < 1:
        parser.error("--max-new-tokens must be >= 1")
    if args.method != "full" and args.budget is None:
        parser.error(f"--method {args.method} needs --budget")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--private" in argv:
        from mpcache.mpc.deploy import private_demo

        return private_demo.main(argv)
    args = parse_args(argv)
    try:
        model, tokenizer = load_bundled() if args.model == "bundled" else load_model(args.model)
    except FileNotFoundError as error:
        if args.model != "bundled":
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(
            f"The bundled checkpoint is missing ({BUNDLED_DIR}/model.safetensors).\n"
            "Train it first with `make train` (python -m mpcache.train, about 85 minutes on 2 cores).",
            file=sys.stderr,
        )
        return 1
    count = lambda text: len(tokenizer.encode(text, add_bos=False))
    budget = None if args.method == "full" else args.budget
    try:
        sample = make_sample(
            args.task, args.length, args.seed, count, depth=args.depth, reserve=prompt_overhead(tokenizer)
        )
        input_ids = torch.tensor([tokenizer.encode(prompt_text(tokenizer, sample))])
        policy = resolve_policy(args.method, None if budget is None else budget_tokens(budget, input_ids.shape[1]))
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    factory, caches = recording_factory(policy)
    params = model.num_parameters()
    print(f"model: {args.model} {model.config.family}, {params / 1e6:.1f}M parameters, {model.config.n_layer} layers")
    print(f"task: {args.task}, prompt {input_ids.shape[1]} tokens, fact at depth {sample.depth:.2f}")
    print("prompt ends: ..." + sample.prompt[-90:].replace("\n", " / "))
    print("model says: ", end="", flush=True)

    ids: list[int] = []
    shown = ""
    start = time.perf_counter()
    first = start
    stream = stream_generate(model, input_ids, args.max_new_tokens, policy=factory, eos_id=tokenizer.eos_id)
    for step, token in enumerate(stream):
        if step == 0:
            first = time.perf_counter()
        ids.append(int(token[0]))
        if ids[-1] == tokenizer.eos_id:  # the model ended its turn
            print(flush=True)
            break
        text = tokenizer.decode(ids)
        if "\n" in text:  # the answer line is over
            text = text[: text.index("\n")]
            print(text[len(shown) :], flush=True)
            shown = text
            break
        print(text[len(shown) :], end="", flush=True)
        shown = text
    else:
        print(flush=True)
    end = time.perf_counter()

    matched = exact_match(shown, sample.answer)
    print(f"expected:   {sample.answer}")
    print(f"match:      {'yes' if matched else 'no'}")
    decode_tokens = len(ids) - 1
    decode_rate = decode_tokens / (end - first) if decode_tokens and end > first else float("nan")
    print(
        f"speed:      prefill {input_ids.shape[1]} tokens in {first - start:.2f} s "
        f"({input_ids.shape[1] / (first - start):.0f} tok/s), decode {decode_rate:.1f} tok/s"
    )
    tokens, nbytes = row_cache_sizes(caches[-1])
    full = full_cache_bytes(model, input_ids.shape[1] + len(ids) - 1)
    method = args.method if budget is None else f"{args.method} (budget {budget})"
    print(
        f"KV cache:   {method}: {float(tokens[0]):.0f} tokens per layer and head, "
        f"{int(nbytes[0]) / 1024:.0f} KiB (full cache: {full / 1024:.0f} KiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
