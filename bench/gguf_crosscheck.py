"""One-off check of the GGUF loader against transformers' own GGUF loader (test-time only).

    PYTHONPATH=/path/to/accelerate python -m bench.gguf_crosscheck [--json bench/results/smollm2_crosscheck.json]

transformers dequantizes the same file with its own code (`gguf_file=`, which needs
`accelerate`; neither is a run-time dependency of mpcache). Compares: fp32 logits on a chat
prompt and on a long plain-text prompt (max absolute difference), 32 greedy tokens, and the
token ids of a set of texts (digits, unicode, code, special tokens) under both tokenizers.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from mpcache.eval.tasks import make_sample
from mpcache.generate import generate
from mpcache.model import checkpoint_folder, load_model
from mpcache.model.gguf_file import smollm2_gguf

TEXTS = [
    "The pass key is 12345. Remember it. 12345 is the pass key.",
    "  leading spaces, tabs\tand\nnewlines\n\n  ",
    "naïve café — 東京 🙂 ümlaut",
    "def f(x):\n    return x ** 2  # 3.14159\n",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "It's they're we've I'd 1,000,000.50 $99",
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.gguf_crosscheck", description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--length", type=int, default=1024, help="tokens of the long plain-text prompt")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import transformers

    gguf = smollm2_gguf()
    start = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    ref_tok = transformers.AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    print(f"transformers loaded the GGUF in {time.perf_counter() - start:.1f} s")
    model, tok = load_model("smollm2")

    chat = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}])
    sample = make_sample("passkey", args.length, 0, lambda text: len(tok.encode(text, add_bos=False)))
    report: dict = {"folder": str(checkpoint_folder("smollm2")), "transformers": transformers.__version__}
    with torch.no_grad():
        for name, text in (("chat", chat), ("passkey", sample.prompt)):
            ids = torch.tensor([tok.encode(text)])
            mine = model(ids)
            theirs = ref(ids).logits
            diff = (mine - theirs).abs().max().item()
            ours = generate(model, ids, 32, eos_id=tok.eos_id).tolist()[0]  # both stop after EOS
            hf = ref.generate(ids, max_new_tokens=32, do_sample=False, pad_token_id=tok.eos_id)[0, ids.shape[1] :]
            same = ours == hf.tolist()
            report[name] = {"tokens": ids.shape[1], "max_abs_logit_diff": diff, "greedy_tokens": len(ours),
                            "greedy_equal": same, "logit_scale": mine.abs().max().item()}
            print(f"{name}: {ids.shape[1]} tokens, max |logit diff| {diff:.3g}, "
                  f"{len(ours)} greedy tokens {'equal' if same else 'DIFFER'}")
    texts = TEXTS + [sample.prompt, chat]
    mismatched = [t[:40] for t in texts if tok.encode(t, add_bos=False) != ref_tok.encode(t, add_special_tokens=False)]
    report["tokenizer_texts"] = len(texts)
    report["tokenizer_mismatches"] = mismatched
    print(f"tokenizer: {len(texts) - len(mismatched)}/{len(texts)} texts encode identically")
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
