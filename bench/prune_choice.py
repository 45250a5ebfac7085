"""Which K of the teacher's layers make the best untrained ``prune:K`` student?

Measured on the held-out prompts of ``bench/distill_curves.py`` (its cache: the same 32 prompts
and the teacher's greedy answers on them), as nats/token of those answers under the untrained
student, for every way ``prune:K`` can choose (``influence``, ``block``, ``even``), for every
contiguous block of ``30 - K`` layers (the oracle that ``block`` tries to find from calibration
text), and for a greedy search: drop one layer at a time, the one whose removal raises the KL
from the teacher least on ``--calibration`` ShareGPT conversations (not the held-out prompts).

The search runs 361 forward passes over the calibration conversations for K = 11 (15 minutes on
a shared core with 6 conversations); ``--no-search`` skips it.

    nice -n 10 python bench/prune_choice.py --depth 11

Whether the untrained student's lead lasts through training is the learning curves' question:
``python bench/distill_curves.py --inits block`` trains the ``block`` choice.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_curves import ROOT, held_out_messages, prompts_split, teacher_reference  # noqa: E402

console = Console(stderr=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=11, help="K: layers the student keeps")
    p.add_argument("--teacher", default="smollm2")
    p.add_argument(
        "--calibration",
        type=int,
        default=6,
        help="ShareGPT conversations the search's KL is measured on",
    )
    p.add_argument(
        "--no-search", action="store_true", help="skip the greedy search (the slow part)"
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache" / "distillguard" / "bench" / "distill_curves",
        help="distill_curves' cache (held-out prompts, the teacher's answers; made if missing)",
    )
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args()


def calibration_logprobs(lm, seqs) -> list:
    import torch

    with torch.inference_mode():
        return [
            torch.log_softmax(lm.model(ids, use_cache=False).logits[0, start - 1 : -1].float(), -1)
            for ids, start in seqs
        ]


def greedy_search(teacher, keep: int, seqs, progress: Progress) -> tuple[list[int], list[dict]]:
    """Drop, one at a time, the layer (never the first or last) whose removal gives the smallest
    KL(teacher || student) on ``seqs``. Hand-written: no library searches layer subsets of a
    Hugging Face decoder."""
    from distillguard.distill.train import only_layers

    ref = calibration_logprobs(teacher, seqs)
    tokens = sum(len(r) for r in ref)

    def kl(idx: list[int]) -> float:
        with only_layers(teacher, idx):
            student = calibration_logprobs(teacher, seqs)
        return sum(float((r.exp() * (r - s)).sum()) for r, s in zip(ref, student)) / tokens

    n = len(teacher.model.model.layers)
    kept, steps = list(range(n)), []
    task = progress.add_task("greedy search", total=sum(m - 2 for m in range(keep + 1, n + 1)))
    while len(kept) > keep:
        scored = []
        for i in kept[1:-1]:
            scored.append((kl([j for j in kept if j != i]), i))
            progress.advance(task)
        value, dropped = min(scored)
        kept.remove(dropped)
        steps.append({"layers": len(kept), "dropped": dropped, "kl": value})
    return kept, steps


def main() -> None:
    import torch

    from distillguard.data.sharegpt import first_turn_pairs
    from distillguard.distill.evaluate import answer_nll
    from distillguard.distill.train import block_distance, only_layers, prune_layers
    from distillguard.models import load_model

    args = parse_args()
    torch.set_num_threads(args.threads)
    args.work.mkdir(parents=True, exist_ok=True)
    curves = argparse.Namespace(
        max_prompt_chars=300, eval_prompts=32, max_tokens=64
    )  # distill_curves' defaults
    prompts_split(curves, 0, args.work)
    messages = held_out_messages(
        args.work / f"prompts-{curves.max_prompt_chars}.json", curves.eval_prompts
    )
    teacher = load_model(args.teacher, device="cpu")
    ref = teacher_reference(curves, teacher, messages, args.work)
    n, keep = len(teacher.model.model.layers), args.depth
    drop = n - keep

    def held_out(idx: list[int]) -> float:
        with only_layers(teacher, idx), torch.inference_mode():
            return answer_nll(teacher, messages, ref["answers"])

    rows = []
    for how in ("influence", "block", "even"):
        student = prune_layers(teacher, keep, how)
        chosen = [
            next(
                i
                for i, t in enumerate(teacher.model.model.layers)
                if torch.equal(t.mlp.down_proj.weight, s.mlp.down_proj.weight)
            )
            for s in student.model.model.layers
        ]
        rows.append({"choice": how, "layers": chosen, "nll": held_out(chosen)})
        console.print(f"{how}: {chosen} NLL {rows[-1]['nll']:.2f}")
    distance = block_distance(teacher, drop)
    blocks = []
    for start in range(1, n - drop):
        idx = [i for i in range(n) if not start <= i < start + drop]
        blocks.append(
            {
                "start": start,
                "layers": idx,
                "angular_distance": float(distance[start]),
                "nll": held_out(idx),
            }
        )
        console.print(
            f"block {start}..{start + drop - 1}: distance {blocks[-1]['angular_distance']:.3f} "
            f"NLL {blocks[-1]['nll']:.2f}"
        )
    search = None
    if not args.no_search:
        seqs = []
        for prompt, answer in first_turn_pairs(24)[
            : args.calibration
        ]:  # block_influence's conversations
            head = teacher.chat_ids([{"role": "user", "content": prompt}])[-96:]
            tail = teacher.tokenizer(answer, add_special_tokens=False)["input_ids"][:64]
            seqs.append((torch.tensor([head + tail]), len(head)))
        started = time.perf_counter()
        with Progress(console=console) as progress:
            kept, steps = greedy_search(teacher, keep, seqs, progress)
        search = {
            "layers": kept,
            "nll": held_out(kept),
            "steps": steps,
            "calibration": args.calibration,
            "seconds": time.perf_counter() - started,
        }
        rows.append({"choice": "greedy KL search", "layers": kept, "nll": search["nll"]})
        console.print(f"search: {kept} NLL {search['nll']:.2f} ({search['seconds']:.0f} s)")
    best = min(blocks, key=lambda b: b["nll"])
    rows.append(
        {
            "choice": "best block (oracle: chosen on the held-out answers)",
            "layers": best["layers"],
            "nll": best["nll"],
        }
    )
    report = {
        "bench": "prune_choice",
        "machine": f"{platform.machine()}, threads {args.threads}",
        "teacher": args.teacher,
        "teacher_nll": ref["nll"],
        "depth": keep,
        "rows": rows,
        "blocks": blocks,
        "search": search,
    }
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"prune_choice_{keep}.json").write_text(json.dumps(report, indent=1))
    lines = [
        f"Untrained `prune:{keep}` of {args.teacher} (teacher {ref['nll']:.2f}): nats/token of the teacher's "
        f"greedy answers on {curves.eval_prompts} held-out prompts",
        "",
        "| layers chosen by | layers | NLL |",
        "|---|---|---|",
    ]
    lines += [
        f"| {r['choice']} | {', '.join(map(str, r['layers']))} | {r['nll']:.2f} |" for r in rows
    ]
    (args.results / f"prune_choice_{keep}.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
