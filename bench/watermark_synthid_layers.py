"""Expected g-lift of each SynthID tournament layer, as a function of the teacher's collision
probability, measured on held-out prompts (not the evaluation prompts of watermark_quality).

Why: the detector weights each (position, layer) table index by the evidence it can carry.
Layer 1 lifts E[g] by exactly (1 - Σp²)/4; each layer concentrates the distribution, so later
layers lift less. How much less depends on the whole distribution, not only on Σp², so it is
measured: the teacher answers ``--prompts`` ShareGPT prompts (``--skip`` past the 96 of the
quality bench) without a watermark at T=0.7; at every step the tempered top-``top_k``
distribution is kept, and the tournament (transformers' ``update_scores``) is run on it with
``--draws`` random g-value draws; the lift of layer ℓ is Σ_x p_final(x)·g_ℓ(x) - 1/2 (the
expectation over the sampled token, exact given the draw; the tail outside the top k is never
lifted). The lifts are averaged within ``--bins`` bins of 1 - Σp² and printed as JSON with the
fitted table that ``watermark.synthid.LAYER_LIFT`` holds.

    python bench/watermark_synthid_layers.py --threads 1 --json bench/results/watermark_synthid_layers.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from transformers import LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_jobs import sharegpt_prompts  # noqa: E402

from distillguard.models.loader import load_model  # noqa: E402
from distillguard.watermark.synthid import SynthIDParams  # noqa: E402

console = Console(stderr=True)
TEMPERATURE = 0.7


class TopKRecorder(LogitsProcessor):
    """After the temperature warper: keeps each step's top-k tempered probabilities. (B, k) per step."""

    def __init__(self, k: int):
        self.k = k
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids, scores):
        self.steps.append(scores.float().softmax(dim=-1).topk(self.k, dim=-1).values)
        return scores


@torch.inference_mode()
def layer_lifts(probs: torch.Tensor, depth: int, draws: int, gen: torch.Generator) -> torch.Tensor:
    """Mean lift of each layer over ``draws`` random g draws. probs (N, k) top-k probabilities
    (their sum is the top-k mass; the rest is the untouched tail) -> (N, depth)."""
    mass = probs.sum(dim=-1, keepdim=True)
    p0 = probs / mass
    out = torch.zeros(len(probs), depth, dtype=torch.float64)
    for _ in range(draws):
        g = torch.randint(0, 2, (*probs.shape, depth), generator=gen).double()  # (N, k, depth)
        p = p0.double()
        for i in range(depth):  # transformers' update_scores, in probability space
            p = p * (1 + g[:, :, i] - (g[:, :, i] * p).sum(dim=-1, keepdim=True))
        out += (p[:, :, None] * g).sum(dim=1) - 0.5  # lift of each layer at the sampled token
    return out / draws * mass.double()  # a tail token is never lifted


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument(
        "--skip", type=int, default=96, help="past the quality bench's evaluation prompts"
    )
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--bins", type=int, default=10)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    sp = SynthIDParams()
    lm = load_model(args.model)
    prompts = sharegpt_prompts(lm, args.prompts, skip=args.skip, max_prompt_tokens=160)
    width = max(len(p.ids) for p in prompts)
    pad = lm.tokenizer.pad_token_id or 0
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, width - len(p.ids) :] = torch.tensor(p.ids)
        mask[b, width - len(p.ids) :] = 1
    rec = TopKRecorder(sp.top_k)
    torch.manual_seed(0)
    console.print(
        f"generating {len(prompts)} x {args.max_new_tokens} tokens (held-out prompts, skip {args.skip})"
    )
    with torch.inference_mode():
        out = lm.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=args.max_new_tokens,
            logits_processor=LogitsProcessorList([TemperatureLogitsWarper(TEMPERATURE), rec]),
            pad_token_id=pad,
            eos_token_id=sorted(lm.eos_token_ids),
        )
    gen = out[:, width:]
    live = torch.ones_like(gen, dtype=torch.bool)
    for b in range(len(gen)):  # steps after a row's end-of-turn are not answer positions
        ends = [i for i, t in enumerate(gen[b].tolist()) if t in lm.eos_token_ids]
        if ends:
            live[b, ends[0] + 1 :] = False
    probs = torch.stack(rec.steps, dim=1)[live[:, : len(rec.steps)]]  # (N, k)
    console.print(f"{len(probs)} positions; simulating the tournament ({args.draws} draws)")
    lifts = layer_lifts(probs, sp.depth, args.draws, torch.Generator().manual_seed(1))  # (N, depth)
    full = probs.double() / probs.sum(dim=-1, keepdim=True).double()
    spread = 1 - (full**2).sum(dim=-1)  # 1 - Σp² of the top-k distribution
    edges = torch.linspace(0, 1, args.bins + 1, dtype=torch.float64)
    table = []
    for i in range(args.bins):
        sel = (spread >= edges[i]) & (spread < edges[i + 1] if i < args.bins - 1 else spread <= 1)
        n = int(sel.sum())
        table.append(
            {
                "spread_lo": round(float(edges[i]), 3),
                "spread_hi": round(float(edges[i + 1]), 3),
                "positions": n,
                "lift": [round(float(x), 5) for x in lifts[sel].mean(dim=0)] if n else None,
            }
        )
    check = (lifts[:, 0] - spread * mass_lift(probs)).mean().abs() if len(probs) else 0.0
    result = {
        "bench": "watermark_synthid_layers",
        "model": args.model,
        "temperature": TEMPERATURE,
        "prompts": len(prompts),
        "skip": args.skip,
        "positions": len(probs),
        "draws": args.draws,
        "depth": sp.depth,
        "top_k": sp.top_k,
        "layer1_vs_formula_mean_diff": round(float(check), 4),
        "mean_lift_per_layer": [round(float(x), 5) for x in lifts.mean(dim=0)],
        "bins": table,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")


def mass_lift(probs: torch.Tensor) -> torch.Tensor:
    """Layer 1's exact lift per unit of 1 - Σp² (top-k mass / 4); the check that the simulation
    agrees with the formula on average (a single draw scatters around it)."""
    return probs.sum(dim=-1).double() / 4


if __name__ == "__main__":
    main()
