"""Antidistillation sampling: what it costs a person's answers, and what it takes from a student.

For each strength λ (``--lambdas``; 0 is the plain teacher) the bundled teacher answers the same
ShareGPT prompts through the in-process serve ``Engine`` (the code path behind the HTTP server,
temperature 0.7, one seed per prompt). Then:

- **cost to a person**: perplexity of the answers under the plain teacher (the watermark bench's
  measure) and the share of answers that end on their own (EOS before the token cap);
- **effect on the mechanism**: the first-order change of the downstream loss after one gradient
  step on the output embedding with the answers' own next-token loss (positive: training on
  these answers *raises* the loss the direction protects); it is what the method is built to
  make positive, so it checks the implementation rather than the claim;
- **effect on a student**: a ``prune:K`` student (K of the teacher's layers; what
  ``distillguard distill train`` starts from) is fine-tuned on each λ's answers, the same steps,
  seed and learning rate, and evaluated on held-out data it never saw: the NLL of held-out real
  ShareGPT answers (the downstream task, disjoint from the answers the direction was computed on)
  and the NLL of the plain teacher's answers to held-out prompts (what a distiller measures).

The student here is small and the data tiny (a 2-core machine), so the student numbers are a
first look, with their spread over ``--seeds``; the paper's effect was shown on GPU-sized runs.

    python bench/antidistill.py --prompts 32 --eval-prompts 16 --downstream 48 --downstream-test 24 \
        --tokens 48 --lambdas 0,0.5,1 --seeds 2 --steps 16
    python bench/antidistill.py ... --lambdas 0 --random-lambdas 1 --out bench/results/antidistill_control.json

Progress goes to stderr, one JSON object to stdout (and ``bench/results/antidistill.json``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _engine_jobs import run_jobs, sharegpt_prompts  # noqa: E402

from distillguard.distill.evaluate import answer_nll  # noqa: E402
from distillguard.distill.train import prune_layers  # noqa: E402
from distillguard.models.loader import load_model  # noqa: E402
from distillguard.serve.antidistill import build_direction, downstream_pairs, random_direction  # noqa: E402
from distillguard.serve.engine import Engine, GenParams  # noqa: E402

console = Console(stderr=True)
RESULTS = Path(__file__).resolve().parent / "results" / "antidistill.json"


def generate(lm, engine, prompts, lam: float, tokens: int, seed: int) -> list[dict]:
    params = [
        GenParams(
            max_new_tokens=tokens, temperature=0.7, seed=seed * 100_003 + p.index, antidistill=lam
        )
        for p in prompts
    ]
    results, _ = run_jobs(engine, [p.ids for p in prompts], params)
    out = []
    for p, r in zip(prompts, results):
        if r.error is not None:
            raise r.error
        ids = lm.tokenizer.encode(r.text, add_special_tokens=False)
        out.append(
            {"prompt": p.text, "text": r.text, "ids": ids, "stopped": r.finish_reason == "stop"}
        )
    return out


def perplexity(lm, answers: list[dict]) -> float:
    nll = answer_nll(
        lm,
        [[{"role": "user", "content": a["prompt"]}] for a in answers],
        [a["ids"] for a in answers],
    )
    return math.exp(nll)


def head_step_effect(lm, direction, answers: list[dict]) -> float:
    """d(downstream loss) along the answers' own descent direction on W, per unit step:
    -G_down · ∇_W L_answers (G unscaled). Positive: a step on these answers raises the loss."""
    pairs = [(a["prompt"], a["text"]) for a in answers if a["ids"]]
    g_answers = build_direction(
        lm, pairs
    ).gradient  # ∇_W L_answers, scaled; only its direction matters
    g_down = direction.gradient / direction.scale
    g_answers = g_answers / g_answers.norm()
    return float(-(g_down * g_answers).sum())


def finetune(
    teacher, answers: list[dict], *, layers: int, steps: int, lr: float, seed: int, batch: int = 8
):
    """A prune:K student, AdamW on the assistant tokens only (a hand loop: both arms must take
    identical, tiny steps; ``distill train`` runs the full Trainer with its own schedule)."""
    torch.manual_seed(seed)
    student = prune_layers(teacher, layers)
    model = student.model
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    examples = []
    for a in answers:
        if not a["ids"]:
            continue
        prompt = teacher.chat_ids([{"role": "user", "content": a["prompt"]}])
        examples.append((prompt, a["ids"]))
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(len(examples), generator=gen)[:batch].tolist()
        opt.zero_grad()
        total = 0
        losses = []
        for i in idx:
            prompt, ans = examples[i]
            ids = torch.tensor([prompt + ans])
            logits = model(ids).logits[0, len(prompt) - 1 : -1].float()
            losses.append(
                torch.nn.functional.cross_entropy(logits, torch.tensor(ans), reduction="sum")
            )
            total += len(ans)
        (torch.stack(losses).sum() / total).backward()
        opt.step()
    model.eval()
    return student


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=48, help="training prompts (answers per λ)")
    ap.add_argument(
        "--eval-prompts", type=int, default=16, help="held-out prompts for the distiller's metric"
    )
    ap.add_argument(
        "--downstream", type=int, default=64, help="ShareGPT answers the direction is computed on"
    )
    ap.add_argument(
        "--downstream-test",
        type=int,
        default=24,
        help="held-out real answers: the student's downstream task",
    )
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--lambdas", default="0,0.5,1")
    ap.add_argument(
        "--random-lambdas",
        default="",
        help="control: a random direction of the same spread at these λ",
    )
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--layers", type=int, default=8, help="student depth (prune:K)")
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1 on a busy machine; 0: one per core)",
    )
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lambdas = [float(x) for x in args.lambdas.split(",")]
    if 0.0 not in lambdas:
        lambdas = [0.0, *lambdas]
    started = time.time()
    load = os.getloadavg()[0]
    lm = load_model("smollm2", device="cpu")
    # The direction from the first --downstream real answers; the downstream *test* answers come
    # after them in file order (disjoint), the prompts after those (sharegpt_prompts skips).
    down_all = downstream_pairs(None, args.downstream + args.downstream_test)
    down_train, down_test = down_all[: args.downstream], down_all[args.downstream :]
    with console.status("computing the direction ..."):
        direction = build_direction(lm, down_train)
    prompts = sharegpt_prompts(
        lm, args.prompts + args.eval_prompts, skip=200, max_prompt_tokens=200
    )
    train_prompts, eval_prompts = prompts[: args.prompts], prompts[args.prompts :]
    conditions = [(str(lam), direction, lam) for lam in lambdas]
    if args.random_lambdas:
        with console.status("a random control direction ..."):
            control = random_direction(lm, down_train, seed=1)
        conditions += [
            (f"random:{lam}", control, float(lam)) for lam in args.random_lambdas.split(",")
        ]
    answers: dict[str, dict[int, list[dict]]] = {}
    with Progress(console=console) as progress:
        task = progress.add_task("generating", total=len(conditions) * args.seeds + 1)
        held_out = None
        for name, direc, lam in conditions:
            engine = Engine(lm, max_batch_rows=16, batch_wait_s=0.01)
            engine.enable_antidistill(direc)
            engine.start()
            try:
                if held_out is None:
                    held_out = generate(lm, engine, eval_prompts, 0.0, args.tokens, seed=999)
                    progress.advance(task)
                answers[name] = {}
                for seed in range(args.seeds):
                    answers[name][seed] = generate(
                        lm, engine, train_prompts, lam, args.tokens, seed
                    )
                    progress.advance(task)
                    console.print(f"generated {name} seed {seed}")
            finally:
                engine.stop()
    eval_msgs = [[{"role": "user", "content": a["prompt"]}] for a in held_out]
    eval_ids = [a["ids"] for a in held_out]
    down_msgs = [[{"role": "user", "content": p}] for p, _ in down_test]
    down_ids = [lm.tokenizer.encode(a, add_special_tokens=False)[:128] for _, a in down_test]
    report = {
        "bench": "antidistill",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "load_avg_1m": load,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "direction": {"tokens": direction.tokens, "downstream_loss": direction.loss},
        "teacher": {
            "downstream_nll": answer_nll(lm, down_msgs, down_ids),
            "heldout_teacher_nll": answer_nll(lm, eval_msgs, eval_ids),
        },
        "lambdas": {},
    }
    with Progress(console=console) as progress:
        task = progress.add_task("fine-tuning students", total=len(conditions) * args.seeds)
        for name, _direc, _lam in conditions:
            rows = []
            for seed in range(args.seeds):
                ans = answers[name][seed]
                student = finetune(
                    lm, ans, layers=args.layers, steps=args.steps, lr=args.lr, seed=seed
                )
                rows.append(
                    {
                        "perplexity": perplexity(lm, ans),
                        "stopped": sum(a["stopped"] for a in ans) / len(ans),
                        "head_step_effect": head_step_effect(lm, direction, ans),
                        "student_downstream_nll": answer_nll(student, down_msgs, down_ids),
                        "student_heldout_teacher_nll": answer_nll(student, eval_msgs, eval_ids),
                    }
                )
                progress.advance(task)
            summary = {k: statistics.mean(r[k] for r in rows) for k in rows[0]}
            summary["runs"] = rows
            summary["sample"] = answers[name][0][0]["text"][:300]
            report["lambdas"][name] = summary
            console.print(
                f"{name}: { ({k: round(v, 3) for k, v in summary.items() if isinstance(v, float)}) }"
            )
    base = report["lambdas"]["0.0"]
    for _lam, s in report["lambdas"].items():
        s["perplexity_cost"] = s["perplexity"] / base["perplexity"] - 1
        s["student_downstream_delta"] = s["student_downstream_nll"] - base["student_downstream_nll"]
        s["student_heldout_delta"] = (
            s["student_heldout_teacher_nll"] - base["student_heldout_teacher_nll"]
        )
    report["seconds"] = time.time() - started
    report["load_avg_1m_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    for lam, s in report["lambdas"].items():
        console.print(
            f"λ={lam}: perplexity {s['perplexity']:.2f} ({s['perplexity_cost']:+.0%}), head-step effect "
            f"{s['head_step_effect']:+.3f}, student downstream NLL {s['student_downstream_nll']:.3f} "
            f"({s['student_downstream_delta']:+.3f}), held-out teacher NLL "
            f"{s['student_heldout_teacher_nll']:.3f} ({s['student_heldout_delta']:+.3f})"
        )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
