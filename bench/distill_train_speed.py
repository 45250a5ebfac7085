"""Training speed of `distill train`: tokens/s before and after the speed settings, side by side.

The same examples, student and loss are trained under each setting, runs interleaved (A B A B
...) so that the shared machine's load hits every setting alike. Two metrics: non-padding tokens
through the student per second of ``Trainer.train`` (wall clock, model loading excluded), and
per CPU-second of the process over the same span, which a machine busy with other work disturbs
far less (both settings run on 1 torch thread, so CPU time is the work done):

- ``before``: batches in random order (padded to the batch's longest), the output layer over
  every position (``TrainConfig(group_by_length=False, sparse_logits=False)``);
- ``after``: batches grouped by length and the output layer on the answer positions only (the
  defaults).

``--compare precision`` measures ``fp32`` against ``bf16`` (``TrainConfig(precision="bf16")``,
mixed precision; on a CPU with AMX-BF16 tiles the matrix products run on them), both with the
default speed settings, and writes ``distill_train_speed_precision.json``.

    nice -n 10 python bench/distill_train_speed.py --data ~/.cache/distillguard/bench/distill_curves/data/n64
    nice -n 10 python bench/distill_train_speed.py --compare precision --student prune:11 --losses topk-kd

``--data`` is a curated dataset directory with harvested logprobs (``bench/distill_curves.py``
writes them under its work directory). One JSON object goes to stdout and to
``bench/results/distill_train_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
# --compare: {setting name: TrainConfig fields}; the ratio reported is the second over the first.
COMPARISONS = {
    "speed": {"before": {"group_by_length": False, "sparse_logits": False}, "after": {}},
    "precision": {"fp32": {}, "bf16": {"precision": "bf16"}},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data",
        type=Path,
        default=Path.home()
        / ".cache"
        / "distillguard"
        / "bench"
        / "distill_curves"
        / "data"
        / "n64",
    )
    p.add_argument("--student", default="prune:8")
    p.add_argument("--losses", default="sft,topk-kd")
    p.add_argument("--examples", type=int, default=64, help="training examples per run (1 epoch)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--compare", choices=sorted(COMPARISONS), default="speed")
    p.add_argument(
        "--out",
        type=Path,
        default=None,
        help="default: bench/results/distill_train_speed.json (--compare speed) or "
        "distill_train_speed_precision.json",
    )
    args = p.parse_args()
    settings = COMPARISONS[args.compare]
    base, new = settings
    if args.out is None:
        suffix = "" if args.compare == "speed" else f"_{args.compare}"
        args.out = ROOT / "bench" / "results" / f"distill_train_speed{suffix}.json"
    if not (args.data / "dataset_dict.json").is_file():
        raise SystemExit(
            f"{args.data} is not a curated dataset; run bench/distill_curves.py first (or pass --data)"
        )

    import torch
    from transformers import TrainerCallback

    from distillguard.distill.train import TrainConfig, train

    torch.set_num_threads(1)

    class CPUClock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            self.cpu = time.process_time()

        def on_train_end(self, *a, **k):
            self.cpu = time.process_time() - self.cpu

    losses = args.losses.split(",")
    runs = {
        loss: {name: {"wall": [], "cpu": [], "final_loss": []} for name in settings}
        for loss in losses
    }
    load = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory() as tmp:
        for rep in range(args.repeats):
            for loss in losses:
                for name, fields in settings.items():
                    clock = CPUClock()
                    summary = train(
                        TrainConfig(
                            data=str(args.data),
                            out=f"{tmp}/s",
                            student=args.student,
                            loss=loss,
                            epochs=1,
                            batch_size=args.batch_size,
                            max_train=args.examples,
                            max_length=256,
                            save_steps=0,
                            **fields,
                        ),
                        callbacks=[clock],
                    )
                    tokens = summary["tokens_per_s"] * summary["train_seconds"]
                    runs[loss][name]["wall"].append(summary["tokens_per_s"])
                    runs[loss][name]["cpu"].append(tokens / clock.cpu)
                    runs[loss][name]["final_loss"].append(
                        round(summary["final_loss"], 4)
                    )  # the same work?
                    load.append(os.getloadavg()[0])
                    console.print(
                        f"[{rep + 1}/{args.repeats}] {loss:8s} {name:7s} {summary['tokens_per_s']:6.1f} tok/s, "
                        f"{tokens / clock.cpu:6.1f} tok/CPU-s ({summary['steps']} steps, "
                        f"{summary['train_seconds']:.0f} s, load {load[-1]:.1f})"
                    )
    results = {}
    for loss, by_setting in runs.items():
        cell = {
            name: {
                "tokens_per_s": statistics.median(m["wall"]),
                "tokens_per_cpu_s": statistics.median(m["cpu"]),
                "runs_tokens_per_s": [round(x, 1) for x in m["wall"]],
                "runs_tokens_per_cpu_s": [round(x, 1) for x in m["cpu"]],
                "final_loss": m["final_loss"],
            }
            for name, m in by_setting.items()
        }
        # Ratios of each interleaved pair (same load), then their median.
        for metric in ("wall", "cpu"):
            pairs = [a / b for a, b in zip(by_setting[new][metric], by_setting[base][metric])]
            cell[f"{new}_over_{base}_{metric}"] = statistics.median(pairs)
            cell[f"pairs_{metric}"] = [round(x, 2) for x in pairs]
        results[loss] = cell
    report = {
        "bench": "distill_train_speed",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load_average_during": [round(x, 1) for x in load],
        "student": args.student,
        "examples": args.examples,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "threads": 1,
        "compare": args.compare,
        "settings": settings,
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
