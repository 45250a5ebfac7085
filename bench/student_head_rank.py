"""Would a factored output head put a deeper student under half the teacher's cost?

SmolLM2-135M ties its 49,152 x 576 embedding to its output head: 28M of the 135M parameters. A
rank-r factorisation of the head (its truncated SVD: 576 -> r -> 49,152) cuts those
multiply-adds by ~576/r. Two measurements decide whether that is worth building:

- **quality**: the teacher with its head truncated to rank r, NLL of its own greedy answers to a
  few prompts (the untruncated head is the floor),
- **cost**: greedy generation (batch 1) of ``prune:15`` with and without a rank-r head, beside the
  teacher and ``prune:11``, interleaved, CPU seconds per token, median of the per-round ratios
  (the method of ``bench/student_cost.py``).

    python bench/student_head_rank.py --ranks 96,144,192,288 --rank-for-cost 144
"""

from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    "Tell me about the history of Rome.",
    "How do I sort a list in Python?",
    "Write a short poem about the sea.",
    "What are the benefits of exercise?",
    "Explain photosynthesis to a child.",
    "Give me three tips for a job interview.",
    "What is the capital of Australia and why?",
    "How does a car engine work?",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--ranks", default="96,144,192,288")
    p.add_argument("--rank-for-cost", type=int, default=144)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "student_head_rank.json"
    )
    args = p.parse_args()

    import torch
    from rich.console import Console
    from student_cost import cost_vs_teacher, cpu_seconds_per_token  # the same interleaved timing

    from distillguard.distill.evaluate import answer_nll, greedy_answers
    from distillguard.distill.train import prune_layers
    from distillguard.models import load_model

    console = Console(stderr=True)
    torch.set_num_threads(args.threads)
    lm = load_model(args.teacher, device="cpu")
    messages = [[{"role": "user", "content": q}] for q in PROMPTS]
    answers, _ = greedy_answers(lm, messages, 64)
    weight = lm.model.get_input_embeddings().weight.detach().float()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)

    def factored(rank: int) -> torch.nn.Module:
        down = torch.nn.Linear(weight.shape[1], rank, bias=False)
        up = torch.nn.Linear(rank, weight.shape[0], bias=False)
        down.weight.data, up.weight.data = vh[:rank].clone(), (u[:, :rank] * s[:rank]).clone()
        return torch.nn.Sequential(down, up)

    full_head = lm.model.lm_head
    quality = {"full": answer_nll(lm, messages, answers)}
    for rank in (int(r) for r in args.ranks.split(",")):
        lm.model.lm_head = factored(rank)
        quality[str(rank)] = answer_nll(lm, messages, answers)
        console.print(
            f"teacher with a rank-{rank} head: NLL of its own answers {quality[str(rank)]:.2f} "
            f"(full head {quality['full']:.2f})"
        )
    lm.model.lm_head = full_head

    low = prune_layers(lm, 15, "even").model
    low.lm_head = factored(args.rank_for_cost)
    models = {
        "teacher": lm.model,
        "prune:15": prune_layers(lm, 15, "even").model,
        f"prune:15, rank-{args.rank_for_cost} head": low,
        "prune:11": prune_layers(lm, 11, "even").model,
    }
    ids = torch.tensor([lm.chat_ids(messages[0])])
    per_token = cpu_seconds_per_token(models, ids, args.rounds, args.tokens, console)
    cost = {name: round(ratio, 3) for name, ratio in cost_vs_teacher(per_token).items()}
    report = {
        "bench": "student_head_rank",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load": os.getloadavg(),
        "config": {k: str(v) for k, v in vars(args).items()},
        "teacher_nll_by_head_rank": quality,
        "cost_vs_teacher": cost,
    }
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report))


if __name__ == "__main__":
    main()
