"""Can a factored output head put a deeper student under half the teacher's cost?

SmolLM2's tied 49,152 x 576 output head is 28M of its 135M parameters and, per generated token,
a quarter of a 15-layer student's compute. This bench replaces a ``prune:K`` student's head by a
rank-r factorisation (576 -> r -> 49,152 with a bias, untied from the input embedding), first
fitted to the teacher's own head by KL on the teacher's final hidden states over ShareGPT
conversations (a local operation: ``prune:K`` already copies the teacher's weights, and no
teacher query is spent), then trains the student with the library's ``train`` on the learning
curves' harvested answers and measures it exactly as ``bench/distill_curves.py`` does.

    nice -n 5 python bench/student_factored_head.py --rank 144 --depth 15 --queries 1000 --loss topk-kd

Needs ``bench/distill_curves.py``'s cache (``--work``): the held-out prompts, the teacher's answers
on them and ``data/nN`` (run the curves with ``--sizes N`` first). The fitted head is cached there
(``factored_head_rR.pt``). Not a ``prune:K`` option (yet): a student saved with this head does not
load back through ``load_model``; the bench measures the student in memory.
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
from distill_curves import ROOT, held_out_messages, measure  # noqa: E402

console = Console(stderr=True)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=144)
    p.add_argument("--depth", type=int, default=15, help="K of prune:K (influence)")
    p.add_argument(
        "--queries",
        type=int,
        default=1000,
        help="train on data/nN of the curves' cache; 0: untrained only",
    )
    p.add_argument("--loss", default="topk-kd")
    p.add_argument(
        "--fit-steps",
        type=int,
        default=600,
        help="Adam steps of the head's KL fit (256 positions each)",
    )
    p.add_argument("--fit-conversations", type=int, default=300)
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache" / "distillguard" / "bench" / "distill_curves",
    )
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    return p.parse_args()


def fit_head(teacher, rank: int, steps: int, conversations: int, progress: Progress):
    """(A, B, bias) with softmax(h A B + bias) close in KL to softmax(h W^T) for the teacher's final
    hidden states h, started from the rank-r SVD of W. Hand-written: a few lines of Adam; no
    library fits a low-rank softmax head to another."""
    import torch

    from distillguard.data.sharegpt import first_turn_pairs

    hidden = []
    with torch.inference_mode():
        for prompt, answer in first_turn_pairs(conversations + 100)[:conversations]:
            ids = (
                teacher.chat_ids([{"role": "user", "content": prompt}])[-96:]
                + teacher.tokenizer(answer, add_special_tokens=False)["input_ids"][:96]
            )
            hidden.append(teacher.model.model(torch.tensor([ids])).last_hidden_state[0])
    hidden = torch.cat(hidden).clone()
    weight = teacher.model.lm_head.weight.detach().clone()  # V x d
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    a = torch.nn.Parameter((vh[:rank].T * s[:rank].sqrt()).clone())  # d x r
    b = torch.nn.Parameter((u[:, :rank] * s[:rank].sqrt()).T.clone())  # r x V
    bias = torch.nn.Parameter(torch.zeros(weight.shape[0]))
    opt = torch.optim.Adam([a, b, bias], lr=2e-3)
    task = progress.add_task(f"rank-{rank} head, KL fit", total=steps)
    kl = float("nan")
    for _ in range(steps):
        h = hidden[torch.randint(len(hidden), (256,))]
        with torch.no_grad():
            target = torch.log_softmax(h @ weight.T, -1)
        loss = (target.exp() * (target - torch.log_softmax(h @ a @ b + bias, -1))).sum(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        kl = float(loss.detach())
        progress.update(task, advance=1, description=f"rank-{rank} head, KL {kl:.3f}")
    return {
        "A": a.detach(),
        "B": b.detach(),
        "bias": bias.detach(),
        "kl": kl,
        "positions": len(hidden),
    }


def install_head(lm, head: dict) -> None:
    import torch

    rank, vocab = head["B"].shape
    lm.token_bytes  # noqa: B018 - cached while the head still has a .weight (LoadedModel reads the vocabulary there)
    layer = torch.nn.Sequential(
        torch.nn.Linear(head["A"].shape[0], rank, bias=False), torch.nn.Linear(rank, vocab)
    )
    with torch.no_grad():
        layer[0].weight.copy_(head["A"].T)
        layer[1].weight.copy_(head["B"].T)
        layer[1].bias.copy_(head["bias"])
    lm.model.config.tie_word_embeddings = False
    lm.model.lm_head = layer


def main() -> None:
    import torch

    import distillguard.distill.train as train_module
    from distillguard.models import load_model

    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    messages = held_out_messages(args.work / "prompts-300.json", 32)
    ref = json.loads((args.work / "teacher_eval.json").read_text())
    teacher = load_model(args.teacher, device="cpu")
    cached = args.work / f"factored_head_r{args.rank}.pt"
    started = time.perf_counter()
    with Progress(console=console) as progress:
        if cached.is_file():
            head = torch.load(cached)
        else:
            head = fit_head(teacher, args.rank, args.fit_steps, args.fit_conversations, progress)
            torch.save(head, cached)
    fit_seconds = time.perf_counter() - started
    student = train_module.prune_layers(teacher, args.depth)
    install_head(student, head)
    compute = sum(p.numel() for n, p in student.model.named_parameters() if "embed_tokens" not in n)
    teacher_compute = sum(
        p.numel() for p in teacher.model.parameters()
    )  # tied: the head is the embedding
    report = {
        "bench": "student_factored_head",
        "machine": f"{platform.machine()}, threads {args.threads}",
        "config": {k: str(v) for k, v in vars(args).items()},
        "fit_kl": head["kl"],
        "fit_seconds": fit_seconds,
        "compute_parameters": compute,
        "teacher_compute_parameters": teacher_compute,
        "compute_ratio": compute / teacher_compute,
    }
    console.print(
        f"prune:{args.depth} + rank-{args.rank} head: {compute / 1e6:.1f}M parameters per token "
        f"({report['compute_ratio']:.2f} of the teacher)"
    )
    report["untrained"] = measure(student, teacher, messages, ref, 64)
    console.print(f"untrained: NLL {report['untrained']['nll']:.2f}")
    if args.queries:
        out = (
            args.work
            / "students"
            / f"factored-r{args.rank}-prune{args.depth}-{args.loss}-n{args.queries}"
        )
        started = time.perf_counter()
        with Progress(console=console) as progress:
            summary = train_module.train(
                train_module.TrainConfig(
                    data=str(args.work / "data" / f"n{args.queries}"),
                    out=str(out),
                    student=f"prune:{args.depth}",
                    teacher=args.teacher,
                    loss=args.loss,
                    epochs=2.0,
                    lr=5e-4,
                    batch_size=8,
                    max_length=256,
                    seed=0,
                    save_steps=0,
                    unlikelihood=0.0,
                ),  # as the grid's points it is compared with
                callbacks=[train_module.ProgressCallback(progress)],
                student=student,
            )  # not a fresh prune:K
        report["train_seconds"] = time.perf_counter() - started
        report["steps"] = summary["steps"]
        report["trained"] = measure(student, teacher, messages, ref, 64)
        t = report["trained"]
        console.print(
            f"trained: NLL {t['nll']:.2f}, ROUGE-L {t['rouge_l']:.3f}, rep4 {t['rep4']:.3f}, "
            f"under the teacher {t['nll_under_teacher']:.2f}"
        )
    args.results.mkdir(parents=True, exist_ok=True)
    name = f"student_factored_head_r{args.rank}_prune{args.depth}_{args.loss}_n{args.queries}.json"
    (args.results / name).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k not in ("untrained", "trained")}))


if __name__ == "__main__":
    main()
