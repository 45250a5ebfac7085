"""Inference cost of pruned students relative to the teacher: greedy generation, interleaved.

Each round generates the same number of tokens (batch 1, greedy, end-of-turn not allowed to stop
it early) with the teacher and with ``prune:K`` students of several depths, in alternating order,
and the cost is the median ratio of CPU seconds per token (CPU time: what a shared machine
disturbs least). The layer choice does not change the cost, only the depth does, so students are
made with evenly spaced layers (no calibration pass). ``--students`` adds any ``prune:`` specs as
``distill train`` builds them (e.g. ``prune:15:mlp768``, 15 layers with their MLPs cut to 768 of
1,536 neurons; the width changes the cost, so those are built exactly).

    nice -n 10 python bench/student_cost.py --depths 8,11,15 --rounds 5
    nice -n 10 python bench/student_cost.py --depths 11 --students prune:15:mlp768,prune:20:mlp512
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--depths", default="8,11,15")
    p.add_argument(
        "--students", default="", help="more student specs (prune:K[:how][:mlpW]), comma-separated"
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "student_cost.json")
    args = p.parse_args()

    import torch
    from rich.console import Console

    from distillguard.distill.train import load_student, prune_layers
    from distillguard.models import load_model

    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    lm = load_model(args.teacher, device="cpu")
    models = {"teacher": lm.model} | {
        f"prune:{k}": prune_layers(lm, int(k), "even").model for k in args.depths.split(",") if k
    }
    models |= {spec: load_student(spec, lm).model for spec in args.students.split(",") if spec}
    ids = torch.tensor(
        [lm.chat_ids([{"role": "user", "content": "Tell me about the history of Rome."}])]
    )
    per_token = cpu_seconds_per_token(models, ids, args.rounds, args.tokens, console)
    ratios = cost_vs_teacher(per_token)
    params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    report = {
        "bench": "student_cost",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load": os.getloadavg(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "students": {
            name: {
                "cost_vs_teacher": round(ratios[name], 3),
                "parameters": params[name],
                "params_vs_teacher": round(params[name] / params["teacher"], 3),
                "tokens_per_cpu_s": round(1 / statistics.median(per_token[name]), 2),
            }
            for name in models
        },
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


def cpu_seconds_per_token(
    models: dict, ids, rounds: int, tokens: int, console
) -> dict[str, list[float]]:
    """Greedy generation of exactly ``tokens`` tokens (batch 1) by each model, in alternating order
    round by round; CPU seconds per token, one value per round and model."""
    import torch

    per_token: dict[str, list[float]] = {name: [] for name in models}
    for r in range(rounds):
        order = list(models.items()) if r % 2 == 0 else list(models.items())[::-1]
        for name, model in order:
            t = time.process_time()
            with torch.inference_mode():
                model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)
            per_token[name].append((time.process_time() - t) / tokens)
        console.print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{n} {1 / v[-1]:.1f} tok/CPU-s" for n, v in per_token.items())
        )
    return per_token


def cost_vs_teacher(per_token: dict[str, list[float]]) -> dict[str, float]:
    """Median over rounds of each model's CPU per token over the teacher's in the same round."""
    return {
        name: statistics.median(s / t for s, t in zip(v, per_token["teacher"]))
        for name, v in per_token.items()
    }


if __name__ == "__main__":
    main()
