"""Does on-policy distillation fix a distilled student's loops? GKD from a kept student, before and after.

The 4,000-query students of ``bench/distill_curves.py`` reach the NLL target but loop under greedy
decoding (rep4 0.45 for top-k KD against the teacher's 0.13), and repetition controls at decoding
time remove the loops without making the text sensible (``bench/distill_decoding.py``). Loops are
the textbook symptom of exposure bias: the student was trained only on the teacher's prefixes and
has never seen its own. On-policy distillation (GKD, Agarwal et al. 2024; ``--loss gkd``) trains
it on answers it samples itself, with the local teacher's full next-token distribution at every
position as the target. This bench continues a kept student with GKD on the prompts of its own
training set (no new teacher answers: only the prompts are used when ``--lmbda 1``) and measures,
on the same 32 held-out prompts as the curves, before and after:

- NLL of the teacher's greedy answers under the student (the headline of the curves),
- ROUGE-L against those answers,
- the student's own greedy answers: their NLL under the teacher and rep4 (coherence).

It needs a local teacher (white-box): a distiller behind an API cannot score the student's own
answers with the teacher, so this is the provider's or an open-weights distiller's recipe.

    nice -n 5 python bench/distill_onpolicy.py --student ~/.cache/distillguard/bench/distill_curves/students/topk-kd-prune11-influence-n4000

Interrupted runs continue from their checkpoint (``--save-steps``). JSON lands in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
WORK = Path.home() / ".cache" / "distillguard" / "bench" / "distill_curves"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--student", required=True, type=Path, help="a kept student directory of distill_curves"
    )
    p.add_argument("--teacher", default="smollm2")
    p.add_argument(
        "--work",
        type=Path,
        default=WORK,
        help="distill_curves' cache (data, held-out prompts, teacher answers)",
    )
    p.add_argument(
        "--queries",
        type=int,
        default=4000,
        help="train on the prompts of this distill_curves data size",
    )
    p.add_argument(
        "--max-train", type=int, default=1000, help="use at most this many of those prompts"
    )
    p.add_argument(
        "--lmbda", type=float, default=1.0, help="share of batches the student answers itself"
    )
    p.add_argument(
        "--beta", type=float, default=0.5, help="generalised JSD: 0 forward KL .. 1 reverse KL"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--gen-max-new-tokens", type=int, default=64)
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--save-steps", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "distill_onpolicy.json")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from distill_curves import (  # the curves' own measurement, so the numbers compare
        held_out_messages,
        measure,
    )
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    from distillguard.distill.train import ProgressCallback, TrainConfig, train
    from distillguard.models import load_model

    messages = held_out_messages(sorted(args.work.glob("prompts-*.json"))[0], args.eval_prompts)
    ref = json.loads(
        (args.work / "teacher_eval.json").read_text()
    )  # the teacher on the curves' held-out prompts
    if len(ref["answers"]) < args.eval_prompts:
        raise SystemExit(
            f"the cached teacher answers cover {len(ref['answers'])} held-out prompts, not {args.eval_prompts}"
        )
    ref = {
        **ref,
        "answers": ref["answers"][-args.eval_prompts :],
        "texts": ref["texts"][-args.eval_prompts :],
    }
    teacher = load_model(args.teacher, device="cpu")
    name = f"gkd-l{args.lmbda:g}-b{args.beta:g}-lr{args.lr:g}-n{args.max_train}-from-{args.student.name}"
    out = args.work / "onpolicy" / name
    with console.status(f"measuring {args.student.name} ..."):
        before = measure(
            load_model(str(args.student), device="cpu"), teacher, messages, ref, args.max_tokens
        )
    console.print(
        f"before: NLL {before['nll']:.3f}, own answers under the teacher {before['nll_under_teacher']:.3f}, "
        f"rep4 {before['rep4']:.3f}"
    )
    t0 = time.perf_counter()
    if (out / "train_summary.json").is_file():
        summary = json.loads((out / "train_summary.json").read_text())
    else:
        with Progress(
            TextColumn("[bold]gkd"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeRemainingColumn(),
            console=console,
        ) as progress:
            summary = train(
                TrainConfig(
                    data=str(args.work / "data" / f"n{args.queries}"),
                    out=str(out),
                    student=str(args.student),
                    teacher=args.teacher,
                    loss="gkd",
                    lmbda=args.lmbda,
                    beta=args.beta,
                    lr=args.lr,
                    epochs=args.epochs,
                    max_train=args.max_train,
                    gen_max_new_tokens=args.gen_max_new_tokens,
                    max_length=256,
                    seed=0,
                    save_steps=args.save_steps,
                ),
                callbacks=[ProgressCallback(progress, "gkd")],
            )
    console.print(
        f"trained {summary['steps']} steps ({summary['on_policy_batches']} on-policy) in "
        f"{summary['train_seconds']:.0f} s"
    )
    after = measure(load_model(str(out), device="cpu"), teacher, messages, ref, args.max_tokens)
    console.print(
        f"after:  NLL {after['nll']:.3f}, own answers under the teacher {after['nll_under_teacher']:.3f}, "
        f"rep4 {after['rep4']:.3f}"
    )
    report = {
        "bench": "distill_onpolicy",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "config": {k: str(v) for k, v in vars(args).items()},
        "teacher": {k: ref[k] for k in ("nll", "tokens_per_s")},
        "before": before,
        "after": after,
        "seconds": time.perf_counter() - t0,
        "train": {k: v for k, v in summary.items() if k != "history"},
        "history": summary.get("history", []),
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps({k: report[k] for k in ("before", "after")}))


if __name__ == "__main__":
    main()
