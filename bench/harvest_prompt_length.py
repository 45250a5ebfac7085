"""How long the bundled ShareGPT first prompts are in the embedded teacher's tokens: the numbers
behind ``--max-prompt-tokens``'s default (``distill harvest``, ``distill eval``, self-instruct).

Each prompt is counted as the harvest's cap counts it (``distillguard.distill.prompt_length``):
the chat template's rendering of the prompt, system prompt and assistant cue included, which is
what the teacher prefills. Writes the quantiles and the share of prompts each candidate cap keeps
to ``bench/results/harvest_prompt_length.json``.

    nice -n 10 python bench/harvest_prompt_length.py     # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from distillguard.distill.prompt_length import PromptTokenCounter
from distillguard.distill.prompts import load_prompts

HERE = Path(__file__).resolve().parent
CAPS = (256, 512, 768, 1024, 1536, 2048, 4096)
QUANTILES = (0.5, 0.75, 0.9, 0.95, 0.98, 0.99, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="smollm2")
    parser.add_argument("--first", type=int, default=None, help="only the first N prompts")
    parser.add_argument("--out", type=Path, default=HERE / "results/harvest_prompt_length.json")
    args = parser.parse_args()
    t0 = time.perf_counter()
    prompts = load_prompts("sharegpt", limit=args.first)
    counter = PromptTokenCounter.load(args.tokenizer)
    lengths = np.array([counter.count(p.as_messages()) for p in prompts])
    first600 = lengths[:600]
    result = {
        "what": "chat-template tokens of the bundled ShareGPT first prompts (the harvest's "
        "--max-prompt-tokens count)",
        "tokenizer": args.tokenizer,
        "prompts": len(lengths),
        "mean": float(lengths.mean()),
        "quantiles": {str(q): float(np.quantile(lengths, q)) for q in QUANTILES},
        "kept_share_by_cap": {str(c): float((lengths <= c).mean()) for c in CAPS},
        "first_600": {
            "quantiles": {str(q): float(np.quantile(first600, q)) for q in QUANTILES},
            "over_cap_by_cap": {str(c): int((first600 > c).sum()) for c in CAPS},
        },
        "seconds": time.perf_counter() - t0,
        "python": platform.python_version(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
