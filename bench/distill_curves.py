"""Learning curves of distillation from the embedded teacher: quality vs number of teacher queries.

The teacher (SmolLM2-135M-Instruct, ``distillguard serve --no-guard --no-watermark`` in a
subprocess) is harvested once through its API, with top-k logprobs, for the largest size; smaller
sizes are prefixes of the same answers. For every (queries, student depth, loss) point a student
``prune:K`` is trained and measured on held-out prompts (disjoint from the training prompts):

- **NLL**: nats per token of the teacher's greedy answers under the student (the teacher's own
  NLL is the floor; a uniform guess over SmolLM2's 49,152 tokens is 10.8 nats),
- **ROUGE-L** of the student's greedy answer against the teacher's,
- **coherence** of the student's own greedy answers: their NLL under the teacher and the share of
  repeated 4-grams (``rep4``), next to the teacher's values on its own answers,
- parameters and greedy tokens/s of student and teacher (the inference-cost ratio).

Losses: ``sft`` (teacher's sampled answers), ``topk-kd`` (those answers plus the API's top-k
logprobs), ``kd`` (those answers with the full logits of a local copy of the teacher); ``gkd``
(on-policy) can be added with ``--losses``. 0 queries is the untrained pruned student.

Answers are capped at ``--max-tokens``; a capped answer is a prefix of what the teacher would
say, and it is kept for training (the held-out greedy answers are capped the same way), as
``distill harvest --keep-capped`` and ``distill curate --keep-capped`` would keep it. Unlike
``distill train`` on such data, this bench's datasets do not mark capped answers, so its SFT
points learned an end-of-turn where the cap fell (one label per capped answer; top-k KD never
trains the end position, and full-logit KD's target there is the teacher's own next token).
Kept so that the cached points stay comparable.

Everything is cached under ``--work`` (harvest store, teacher answers, one JSON per point, and
the checkpoints of the point in training), so an interrupted run continues, mid-point included,
and a larger grid reuses the smaller one. The committed report's points are merged into the cache
first (``merge_committed``), so a fresh machine continues the grid instead of forgetting it.
Training settings other than the grid's (``--epochs``, ``--lr``) make a separate point, named and
tabled as a variant of its loss (e.g. "topk-kd, 4 epochs").

    nice -n 10 python bench/distill_curves.py                               # 250, 1000 queries; prune:8, prune:15
    nice -n 10 python bench/distill_curves.py --sizes 250,1000,4000 --losses sft,topk-kd,kd,gkd

On a GPU, ``--device cuda --tf32`` trains and measures there (float32, TF32 products; the points
record it and the tables mark them), and ``bench/distill_curves_gpu.sh`` runs one process per point
side by side. ``--precision bf16`` trains a mixed-precision variant (1.5-1.8x on a CPU with AMX).

Progress goes to stderr, one JSON object to stdout; JSON, a plot and the students' sample answers
land in ``--results``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console

console = Console(stderr=True)
ROOT = Path(__file__).resolve().parent.parent
EPOCHS, LR = (
    2.0,
    5e-4,
)  # the grid's settings; a point trained otherwise is named and tabled as a variant
# Settings every point of a report shares (the harvest and the measurement): a committed report
# measured with other values is not merged into the cache (see merge_committed).
SHARED_SETTINGS = (
    "teacher",
    "max_tokens",
    "top_logprobs",
    "temperature",
    "max_prompt_chars",
    "eval_prompts",
    "batch_size",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="250,1000", help="teacher queries per point, comma-separated")
    p.add_argument(
        "--depths", default="8,15", help="student depths K (prune:K of the teacher's 30 layers)"
    )
    p.add_argument(
        "--inits",
        default="influence",
        help="how prune:K chooses its layers: influence, block, even (comma-separated)",
    )
    p.add_argument("--losses", default="sft,topk-kd,kd", help="sft, topk-kd, kd, gkd")
    p.add_argument("--teacher", default="smollm2")
    p.add_argument(
        "--teacher-url",
        default=None,
        help="harvest from this running server (its model must be "
        "--teacher) instead of starting one",
    )
    p.add_argument(
        "--max-tokens", type=int, default=64, help="answer length cap (harvest and evaluation)"
    )
    p.add_argument("--top-logprobs", type=int, default=5)
    p.add_argument("--temperature", type=float, default=0.7, help="harvest sampling temperature")
    p.add_argument(
        "--max-prompt-chars", type=int, default=300, help="use ShareGPT prompts up to this length"
    )
    p.add_argument("--eval-prompts", type=int, default=32)
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--lr", type=float, default=LR)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument(
        "--serve-batch-rows",
        type=int,
        default=16,
        help="the teacher server's --max-batch-rows; with --answers-per-query N, concurrency x N rows "
        "can be decoded together",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (serve and training); 1 avoids stalls "
        "on a machine busy with other work",
    )
    p.add_argument(
        "--work",
        type=Path,
        default=Path.home() / ".cache" / "distillguard" / "bench" / "distill_curves",
        help="cache directory (harvest store, teacher answers, one JSON per point)",
    )
    p.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    p.add_argument(
        "--harvest-only",
        action="store_true",
        help="harvest (resumably) the largest size and stop: e.g. while another run trains on smaller ones",
    )
    p.add_argument(
        "--save-steps",
        type=int,
        default=25,
        help="checkpoint every this many steps: an interrupted "
        "point continues from there on the next run",
    )
    p.add_argument(
        "--keep-students",
        action="store_true",
        help="keep each trained student under --work/students (200+ MB each) instead of deleting it",
    )
    p.add_argument(
        "--remeasure",
        action="store_true",
        help="measure again every cached point whose student is kept under --work/students",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the students and the teacher are measured, in float32 either way (load_model would "
        "pick bfloat16 on a GPU). Training uses a GPU whenever there is one (the HF Trainer's choice)",
    )
    p.add_argument(
        "--tf32",
        action="store_true",
        help="on a GPU, let float32 matrix products use TF32 (about 8x faster on Hopper; the points "
        "record it, and a CPU point rerun this way measures what it changes)",
    )
    p.add_argument(
        "--answers-per-query",
        type=int,
        default=1,
        help="n of each API request: the teacher's answers per query (more tokens bought, not more "
        "queries); a point with n > 1 is a variant, trained on every answer",
    )
    p.add_argument(
        "--ce-weight",
        type=float,
        default=0.0,
        help="topk-kd: share of the loss that is cross-entropy on the teacher's sampled tokens "
        '(TrainConfig.ce_weight); a point trained with it is a variant ("topk-kd, 0.5 CE")',
    )
    p.add_argument(
        "--unlikelihood",
        type=float,
        default=0.0,
        help="sft/topk-kd: weight of token-level unlikelihood (TrainConfig.unlikelihood); a point "
        'trained with it is a variant ("topk-kd, UL 1")',
    )
    p.add_argument(
        "--precision",
        choices=("fp32", "bf16", "tf32"),
        default="fp32",
        help="training precision (TrainConfig.precision); a point trained otherwise than fp32 is a "
        "variant, named and tabled as such (measurement stays float32)",
    )
    p.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report every point cached under --work (e.g. after several partial grids)",
    )
    return p.parse_args()


def prompts_split(args, n_train: int, work: Path):
    from distillguard.distill.prompts import Prompt, load_prompts

    cache = (
        work / f"prompts-{args.max_prompt_chars}.json"
    )  # parsing the bundled ShareGPT takes a minute or more
    if cache.is_file():
        unique = [
            Prompt(p["id"], tuple(map(tuple, p["messages"]))) for p in json.loads(cache.read_text())
        ]
        need = n_train + args.eval_prompts
        if len(unique) >= need:
            return unique[:n_train], unique[-args.eval_prompts :]
    seen, unique = set(), []
    for p in load_prompts("sharegpt", max_chars=args.max_prompt_chars):
        text = " ".join(c for _, c in p.messages).strip().lower()
        if len(text) >= 10 and text not in seen:
            seen.add(text)
            unique.append(p)
    need = n_train + args.eval_prompts
    if len(unique) < need:
        raise SystemExit(
            f"only {len(unique)} ShareGPT prompts of <= {args.max_prompt_chars} chars; need {need}"
        )
    cache.write_text(json.dumps([{"id": p.id, "messages": p.messages} for p in unique]))
    return unique[:n_train], unique[-args.eval_prompts :]  # held-out prompts from the other end


def held_out_messages(prompts_file: Path, n: int) -> list[list[dict]]:
    """The held-out prompts of a prompt cache written by ``prompts_split`` (its last ``n``), as chat
    messages: for the benches that measure students the way the curves do."""
    return [
        [{"role": r, "content": c} for r, c in q["messages"]]
        for q in json.loads(prompts_file.read_text())[-n:]
    ]


def harvest_all(args, prompts, work: Path) -> list[dict]:
    """Teacher answers (with top-k logprobs) for ``prompts`` through the API; cached in a store."""
    from distillguard.distill.harvest import HarvestConfig, harvest
    from distillguard.distill.store import ResponseStore, classify_choice

    store = ResponseStore(work / "harvest" / "store.sqlite")
    # A long timeout: a CPU teacher on a busy machine takes minutes per batch, and a client that
    # gives up and resends only queues the same work again behind what the server still computes.
    config = HarvestConfig(
        teacher="http://127.0.0.1:0/v1",
        model=args.teacher,
        concurrency=args.concurrency,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_logprobs=args.top_logprobs,
        seed=0,
        timeout_s=3600,
        n=args.answers_per_query,
    )
    todo = len(prompts) - len(store.done() & {fingerprint_of(config, p) for p in prompts})
    seconds = 0.0
    if todo and args.teacher_url:
        config = HarvestConfig(**{**vars(config), "teacher": args.teacher_url})
        t0 = time.perf_counter()
        with console.status(f"harvest {todo} answers from {args.teacher_url} ..."):
            report = asyncio.run(harvest(config, prompts, store))
        seconds = time.perf_counter() - t0
        console.print(
            f"harvest: {report.stored_ok} ok, malformed {report.malformed}, failed {report.failed}, "
            f"{report.completion_tokens} completion tokens in {seconds:.0f} s"
        )
    elif todo:
        from rich.progress import Progress

        from distillguard.serve.process import serve_subprocess

        with serve_subprocess(
            "--model",
            args.teacher,
            "--no-guard",
            "--no-watermark",
            "--threads",
            str(args.threads),
            "--max-batch-rows",
            str(args.serve_batch_rows),
            log_path=work / "harvest" / "serve.log",
            timeout_s=300,
            poll_s=0.5,
            stop_timeout_s=30,
        ) as server:
            config = HarvestConfig(**{**vars(config), "teacher": f"{server.url}/v1"})
            with Progress(console=console) as progress:
                task = progress.add_task(f"harvest {todo} answers", total=len(prompts))

                def on_progress(report, budget):
                    progress.update(task, completed=report.finished())

                t0 = time.perf_counter()
                report = asyncio.run(harvest(config, prompts, store, on_progress=on_progress))
                seconds = time.perf_counter() - t0
            console.print(
                f"harvest: {report.stored_ok} ok, malformed {report.malformed}, failed {report.failed}, "
                f"{report.completion_tokens} completion tokens in {seconds:.0f} s"
            )
    by_prompt = {}
    # Per-answer counts for the README (how many of the paid answers are whole, capped or empty, and how
    # many a rule that judged a request by all its answers at once would have kept): recorded in meta.json
    # so those numbers come from this command, not from queries by hand.
    counts = {
        "requests": 0,
        "answers": {},
        "whole_answers_in_all_whole_requests": 0,
        "requests_all_whole": 0,
        "whole_answers_in_mixed_requests": 0,
        "requests_mixed": 0,
    }
    for rec in store.records(only_ok=False):
        if (
            rec["request"].get("n", 1) != args.answers_per_query
        ):  # the store holds requests of other n too
            continue
        kinds = [classify_choice(c) for c in ((rec["response"] or {}).get("choices") or [])]
        counts["requests"] += 1
        for kind in kinds:
            counts["answers"][kind] = counts["answers"].get(kind, 0) + 1
        whole = kinds.count("ok")
        if kinds and whole == len(kinds):
            counts["requests_all_whole"] += 1
            counts["whole_answers_in_all_whole_requests"] += whole
        elif whole:
            counts["requests_mixed"] += 1
            counts["whole_answers_in_mixed_requests"] += whole
        if rec["status"] in (
            "ok",
            "malformed:truncated",
        ):  # a capped answer is still the teacher's prefix
            choices = rec["response"]["choices"]
            by_prompt[rec["prompt_id"]] = [
                {
                    # one answer per query keeps the id it always had (the datasets of earlier runs stay valid)
                    "id": rec["prompt_id"] + (f"#{k}" if len(choices) > 1 else ""),
                    "prompt_id": rec["prompt_id"],
                    "messages": rec["request"]["messages"],
                    "response": choice["message"]["content"],
                    "logprobs": (choice.get("logprobs") or {}).get("content"),
                }
                for k, choice in enumerate(choices)
                # an empty choice is no answer; a capped one is kept, as above
                if classify_choice(choice) in ("ok", "malformed:truncated")
            ]
    meta_path = work / "harvest" / "meta.json"
    runs = json.loads(meta_path.read_text()).get("runs", []) if meta_path.is_file() else []
    if todo:  # every run that harvested, kept across reruns (a resumed harvest is several runs)
        stored = report.stored_ok + sum(report.malformed.values())
        runs.append(
            {
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "n": args.answers_per_query,
                "seconds": round(seconds, 1),
                "requests_stored": stored,
                "requests_per_minute": round(60 * stored / seconds, 1) if seconds else None,
            }
        )
    meta = {
        "harvest_seconds_this_run": seconds,
        "runs": runs,
        f"n={args.answers_per_query}": counts,
        **store.totals(),
    }
    meta_path.write_text(json.dumps(meta, indent=2))
    store.close()
    return [by_prompt[p.id] for p in prompts if p.id in by_prompt]  # per query: its answers


def fingerprint_of(config, prompt) -> str:
    from distillguard.distill.store import fingerprint

    return fingerprint(config.request(prompt))


def teacher_reference(args, teacher, eval_messages, work: Path) -> dict:
    """The teacher's greedy answers on the held-out prompts (token ids), its NLL and speed; cached."""
    from distillguard.distill.evaluate import answer_nll, greedy_answers

    path = work / "teacher_eval.json"
    if path.is_file():
        return json.loads(path.read_text())
    with console.status("teacher greedy answers on the held-out prompts ..."):
        answers, tps = greedy_answers(teacher, eval_messages, args.max_tokens)
        ref = {
            "answers": answers,
            "tokens_per_s": tps,
            "nll": answer_nll(teacher, eval_messages, answers),
            "parameters": sum(p.numel() for p in teacher.model.parameters()),
            "texts": [
                teacher.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers
            ],
        }
    path.write_text(json.dumps(ref))
    return ref


def measure(student, teacher, eval_messages, ref, max_tokens: int) -> dict:
    from rouge_score import rouge_scorer

    from distillguard.distill.evaluate import answer_nll, greedy_answers, repeated_ngrams

    student.model.eval()
    answers, tps = greedy_answers(student, eval_messages, max_tokens)
    texts = [student.tokenizer.decode(a, skip_special_tokens=True).strip() for a in answers]
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    rouge = [
        1.0 if t == s else scorer.score(t, s)["rougeL"].fmeasure
        for t, s in zip(ref["texts"], texts)
    ]
    return {
        "nll": answer_nll(student, eval_messages, ref["answers"]),
        "rouge_l": sum(rouge) / len(rouge),
        "nll_under_teacher": answer_nll(teacher, eval_messages, answers),
        "rep4": repeated_ngrams(answers),
        "tokens_per_s": tps,
        "parameters": sum(p.numel() for p in student.model.parameters()),
        "samples": [{"teacher": t, "student": s} for t, s in list(zip(ref["texts"], texts))[:3]],
    }


def main() -> None:
    import signal

    signal.signal(
        signal.SIGTERM, lambda *_: sys.exit(143)
    )  # run the finally blocks: stop the teacher server
    args = parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    depths = [int(d) for d in args.depths.split(",")]
    inits = args.inits.split(",")
    losses = args.losses.split(",")
    work = args.work
    (work / "harvest").mkdir(parents=True, exist_ok=True)
    (work / "points").mkdir(parents=True, exist_ok=True)
    args.results.mkdir(parents=True, exist_ok=True)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    from distillguard.distill.curate import save_dataset
    from distillguard.distill.train import ProgressCallback, TrainConfig, load_student, train
    from distillguard.models import load_model

    committed = merge_committed(args, work)
    if args.report_only:
        ref_path = work / "teacher_eval.json"
        if ref_path.is_file():
            ref = json.loads(ref_path.read_text())
        elif committed:
            ref = committed["teacher"]
        else:
            raise SystemExit(
                f"nothing to report: {work} has no measured teacher and {args.results} no report"
            )
        return write_report(
            args,
            work,
            [json.loads(f.read_text()) for f in sorted((work / "points").glob("*.json"))],
            ref,
            committed,
        )
    train_prompts, eval_prompts = prompts_split(args, max(sizes), work)
    answered = harvest_all(args, train_prompts, work)
    console.print(
        f"{sum(map(len, answered))} usable teacher answers to {len(answered)} of {len(train_prompts)} "
        f"training prompts"
    )
    for n in sizes:  # before any training: several runs (one point each) can then share the cache
        if not (data_dir(work, n, args.answers_per_query) / "dataset_dict.json").is_file():
            save_dataset(
                [r for rows in answered[:n] for r in rows],
                [],
                data_dir(work, n, args.answers_per_query),
            )
    if args.harvest_only:
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no GPU here")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    hardware = {
        "trained_on": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "measured_on": torch.cuda.get_device_name() if args.device == "cuda" else "cpu",
        # either switch turns TF32 on: --tf32 here, or --precision tf32 through the Trainer
        "tf32": bool((args.tf32 or args.precision == "tf32") and torch.cuda.is_available()),
    }
    eval_messages = [p.as_messages() for p in eval_prompts]
    teacher = on_device(load_model(args.teacher, device="cpu"), args.device)
    ref = teacher_reference(args, teacher, eval_messages, work)
    console.print(f"teacher: NLL {ref['nll']:.3f} nats/token, {ref['tokens_per_s']:.1f} tok/s")

    points = []
    grid = [(0, d, init, "untrained") for d in depths for init in inits]
    grid += [(n, d, init, loss) for n in sizes for d in depths for init in inits for loss in losses]
    for i, (n, depth, init, loss) in enumerate(grid, 1):
        ce = args.ce_weight if loss == "topk-kd" else 0.0
        ul = args.unlikelihood if loss in ("sft", "topk-kd") else 0.0
        name = point_name(
            loss,
            depth,
            init,
            n,
            args.epochs,
            args.lr,
            args.precision,
            args.answers_per_query,
            ce,
            ul,
        )
        path = work / "points" / f"{name}.json"
        kept = work / "students" / name
        if path.is_file() and args.remeasure and n and (kept / "train_summary.json").is_file():
            point = json.loads(path.read_text())
            t0 = time.perf_counter()
            point.update(
                measure(
                    on_device(load_model(str(kept), device="cpu"), args.device),
                    teacher,
                    eval_messages,
                    ref,
                    args.max_tokens,
                ),
                measured_on=hardware["measured_on"],
            )
            point["eval_seconds"] = time.perf_counter() - t0
            path.write_text(json.dumps(point, indent=2))
            console.print(
                f"{name} measured again: NLL {point['nll']:.3f}, under the teacher {point['nll_under_teacher']:.3f}, "
                f"rep4 {point['rep4']:.3f}"
            )
            points.append(point)
            continue
        if path.is_file():
            points.append(json.loads(path.read_text()))
            continue
        spec = f"prune:{depth}:{init}"
        console.rule(f"[{i}/{len(grid)}] {loss}, {spec}, {n} queries")
        t0 = time.perf_counter()
        if n == 0:
            # layers chosen on the CPU, as train() chooses them: a GPU's rounding could reorder near ties
            student = on_device(
                load_student(spec, teacher if args.device == "cpu" else args.teacher), args.device
            )
            summary = {"steps": 0, "examples": 0}
        else:
            data = data_dir(work, n, args.answers_per_query)
            out = work / "students" / name
            with Progress(
                TextColumn(f"[bold]{name}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TimeElapsedColumn(),
                TimeRemainingColumn(),
                console=console,
            ) as progress:
                summary = train(
                    TrainConfig(
                        data=str(data),
                        out=str(out),
                        student=spec,
                        teacher=args.teacher,
                        loss=loss,
                        epochs=args.epochs,
                        lr=args.lr,
                        batch_size=args.batch_size,
                        max_length=256,
                        seed=0,
                        save_steps=args.save_steps,
                        precision=args.precision,
                        ce_weight=ce,
                        unlikelihood=ul,
                    ),
                    callbacks=[ProgressCallback(progress)],
                )
            student = on_device(load_model(str(out), device="cpu"), args.device)
        train_s = time.perf_counter() - t0
        result = {
            "queries": n,
            "depth": depth,
            "init": init,
            "loss": loss,
            "lr": args.lr,
            "epochs": args.epochs,
            **(
                {"precision": args.precision, "answers_per_query": args.answers_per_query}
                if n
                else {}
            ),
            **({"ce_weight": ce} if n and ce else {}),
            **({"unlikelihood": ul} if n and ul else {}),
            "train_seconds": train_s,
            **hardware,
            "examples": summary["examples"],
            "steps": summary["steps"],
            **measure(student, teacher, eval_messages, ref, args.max_tokens),
        }
        result["eval_seconds"] = time.perf_counter() - t0 - train_s
        if n and not args.keep_students:
            shutil.rmtree(work / "students" / name, ignore_errors=True)  # 200+ MB each
        path.write_text(json.dumps(result, indent=2))
        points.append(result)
        console.print(
            f"NLL {result['nll']:.3f} (teacher {ref['nll']:.3f}), ROUGE-L {result['rouge_l']:.3f}, "
            f"{result['tokens_per_s']:.0f} tok/s; train {train_s:.0f} s, eval {result['eval_seconds']:.0f} s"
        )
        del student
        torch.cuda.empty_cache() if torch.cuda.is_available() else None

    # points of other settings (e.g. an --epochs variant measured by an earlier run) stay in the report
    others = [json.loads(f.read_text()) for f in sorted((work / "points").glob("*.json"))]
    names = {point_name_of(p) for p in points}
    write_report(
        args, work, points + [p for p in others if point_name_of(p) not in names], ref, committed
    )


def on_device(lm, device: str):
    """``lm`` (loaded in float32 on the CPU) moved to ``device`` as it is: measured in float32 there
    too, so that a point measured on a GPU compares with the CPU's."""
    import dataclasses

    import torch

    if device == "cpu":
        return lm
    lm.model.to(device)
    return dataclasses.replace(lm, device=torch.device(device))


def data_dir(work: Path, n: int, answers_per_query: int = 1) -> Path:
    return work / "data" / (f"n{n}" if answers_per_query == 1 else f"n{n}x{answers_per_query}")


def point_name(
    loss: str,
    depth: int,
    init: str,
    n: int,
    epochs: float = EPOCHS,
    lr: float = LR,
    precision: str = "fp32",
    answers_per_query: int = 1,
    ce_weight: float = 0.0,
    unlikelihood: float = 0.0,
) -> str:
    # evenly spaced layers were the only choice before: their cached points keep the old names
    name = f"{loss}-prune{depth}{'' if init == 'even' else '-' + init}-n{n}"
    if n and answers_per_query != 1:
        name += f"x{answers_per_query}"
    if n and precision != "fp32":
        name += f"-{precision}"
    if n and epochs != EPOCHS:
        name += f"-e{epochs:g}"
    if n and lr != LR:
        name += f"-lr{lr:g}"
    if n and ce_weight:
        name += f"-ce{ce_weight:g}"
    if n and unlikelihood:
        name += f"-ul{unlikelihood:g}"
    return name


def point_name_of(p: dict) -> str:
    return point_name(
        p["loss"],
        p["depth"],
        p.get("init", "even"),
        p["queries"],
        p.get("epochs", EPOCHS),
        p.get("lr", LR),
        p.get("precision", "fp32"),
        p.get("answers_per_query", 1),
        p.get("ce_weight", 0.0),
        p.get("unlikelihood", 0.0),
    )


def variant(p: dict) -> str:
    """The loss, plus the training settings where they differ from the grid's: 'topk-kd, 4 epochs'."""
    trained = bool(p["queries"])  # an untrained point has no training settings
    extra = (
        ([f"{p['epochs']:g} epochs"] if p.get("epochs", EPOCHS) != EPOCHS else [])
        + ([f"lr {p['lr']:g}"] if trained and p.get("lr", LR) != LR else [])
        + ([p["precision"]] if trained and p.get("precision", "fp32") != "fp32" else [])
        + (
            [f"{p['answers_per_query']} answers/query"]
            if trained and p.get("answers_per_query", 1) != 1
            else []
        )
        + ([f"{p['ce_weight']:g} CE"] if trained and p.get("ce_weight") else [])
        + ([f"UL {p['unlikelihood']:g}"] if trained and p.get("unlikelihood") else [])
    )
    return ", ".join([p["loss"], *extra])


def merge_committed(args, work: Path) -> dict | None:
    """The committed report (``--results``/distill_curves.json), its points copied into the cache
    where the cache lacks them. The cache lives on one machine, and a fresh one (every session of
    this project starts on one) would otherwise write a report without every point measured
    before. None when there is no report or it was measured with other shared settings."""
    path = args.results / "distill_curves.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    theirs = report.get("config", {})
    differ = [k for k in SHARED_SETTINGS if str(theirs.get(k)) != str(getattr(args, k))]
    if differ:
        console.print(f"[yellow]not merging {path}: measured with other {', '.join(differ)}")
        return None
    merged = 0
    for p in report["points"]:
        target = work / "points" / f"{point_name_of(p)}.json"
        if not target.exists():
            target.write_text(json.dumps({**p, "merged_from": path.name}, indent=2))
            merged += 1
    if merged:
        console.print(f"{merged} points merged from {path} (measured on an earlier machine)")
    return report


def student_label(depth: int, init: str, *, layer_choice: bool = True) -> str:
    """The student's spec as a person writes it: ``prune:K`` for the default layer choice
    (influence), ``prune:K:even`` / ``prune:K:block`` otherwise, then ``:mlpW`` with MLPs cut to W
    neurons (``--inits influence:mlpW``). Without ``layer_choice``: its name in student_cost.json,
    where depth and width set the cost and the layer choice does not."""
    from distillguard.distill.train import parse_prune_spec

    _, how, width = parse_prune_spec(f"prune:{depth}:{init}")
    return (
        f"prune:{depth}"
        + (f":{how}" if layer_choice and how != "influence" else "")
        + (f":mlp{width}" if width is not None else "")
    )


def student_of(p: dict) -> tuple[int, str]:
    return p["depth"], p.get("init", "even")


def power_law_fits(
    points: list[dict], floor: float, at: tuple[int, ...] = (250, 1000, 4000)
) -> list[dict]:
    """Per (depth, loss): ``nll(n) = floor + B * n**-alpha`` fitted by least squares in log-log space
    to the trained points (floor = the teacher's own NLL, which no student can beat on average),
    and its extrapolation to ``at`` queries. Two points fit exactly: an extrapolation, not a result."""
    import numpy as np

    fits = []
    for student, loss in sorted({(student_of(p), variant(p)) for p in points if p["queries"] > 0}):
        pts = sorted(
            (
                p
                for p in points
                if student_of(p) == student and variant(p) == loss and p["queries"] > 0
            ),
            key=lambda p: p["queries"],
        )
        if len(pts) < 2 or any(p["nll"] <= floor for p in pts):
            continue
        x = np.log([p["queries"] for p in pts])
        y = np.log([p["nll"] - floor for p in pts])
        slope, intercept = np.polyfit(x, y, 1)
        fits.append(
            {
                "depth": student[0],
                "init": student[1],
                "loss": loss,
                "form": "nll = teacher_nll + B * queries^-alpha",
                "B": float(np.exp(intercept)),
                "alpha": float(-slope),
                "fitted_on": [p["queries"] for p in pts],
                "extrapolated_nll": {
                    str(n): float(floor + np.exp(intercept) * n**slope) for n in at
                },
            }
        )
    return fits


def write_report(
    args, work: Path, points: list[dict], ref: dict, committed: dict | None = None
) -> None:
    """``ref``: the teacher's cached measurement, or the committed report's teacher block."""
    from distillguard.distill.evaluate import repeated_ngrams

    meta = work / "harvest" / "meta.json"
    report = {
        "bench": "distill_curves",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared)",
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "harvest": json.loads(meta.read_text())
        if meta.is_file()
        else (committed or {}).get("harvest", {}),
        "teacher": {
            "spec": args.teacher,
            "nll": ref["nll"],
            "tokens_per_s": ref["tokens_per_s"],
            "parameters": ref["parameters"],
            "rep4": ref["rep4"] if "rep4" in ref else repeated_ngrams(ref["answers"]),
            "nll_under_teacher": ref["nll"],
        },  # its own greedy answers: the coherence reference
        "points": sorted(points, key=lambda p: (*student_of(p), variant(p), p["queries"])),
        "fits": power_law_fits(points, ref["nll"]),
    }
    (args.results / "distill_curves.json").write_text(json.dumps(report, indent=2))
    plot(report, args.results / "distill_curves.png")
    (args.results / "distill_curves.md").write_text(grid_markdown(report, student_costs()))
    (args.results / "distill_curves_samples.md").write_text(samples_markdown(report))
    print(json.dumps(report))


def samples_markdown(report: dict) -> str:
    """The first held-out answers of the teacher and of every student trained on the most queries
    its loss got, side by side: what "coherent" means is read here, the table's numbers only point."""
    best = {}
    for p in report["points"]:
        key = (*student_of(p), variant(p))
        if (
            p["queries"]
            and p.get("samples")
            and p["queries"] >= best.get(key, {"queries": 0})["queries"]
        ):
            best[key] = p
    if not best:
        return ""
    first = next(iter(best.values()))["samples"]
    lines = [
        "# Greedy answers to the first held-out prompts",
        "",
        "Written by `bench/distill_curves.py` from its points: the teacher's answer, then each student's "
        "(its largest number of teacher queries, per loss), capped at 64 tokens.",
        "",
    ]
    for i, sample in enumerate(first):
        lines += [f"## Prompt {i + 1}", "", f"- **teacher**: {sample['teacher']!r}"]
        for key in sorted(best, key=lambda k: (-k[0], k[1] != "influence", k[2])):
            p = best[key]
            if i < len(p["samples"]):
                lines.append(
                    f"- **`{student_label(*key[:2])}` {key[2]}, {p['queries']:,} queries{gpu_mark(p)}**"
                    + (f" (rep4 {p['rep4']:.2f})" if "rep4" in p else "")
                    + f": {p['samples'][i]['student']!r}"
                )
        lines.append("")
    return "\n".join(lines)


def student_costs() -> dict:
    """Each student's cost vs the teacher (bench/student_cost.py, measured side by side): the depths
    from student_cost.json, the MLP-width students from student_cost_width.json."""
    costs = {}
    for name in ("student_cost_width.json", "student_cost.json"):
        cost_file = ROOT / "bench" / "results" / name
        if cost_file.is_file():
            costs |= json.loads(cost_file.read_text())["students"]
    return costs


def grid_markdown(report: dict, costs: dict) -> str:
    """The README's tables: held-out NLL (ROUGE-L) per student and loss against teacher queries, and
    the coherence of every point measured for it (rep4 and the own answers' NLL under the teacher)."""
    points = report["points"]
    sizes = sorted({p["queries"] for p in points})  # 0: the untrained pruned student
    losses = ["untrained", "sft", "topk-kd", "kd", "gkd"]
    lines = [
        "| student (cost vs teacher) | loss | " + " | ".join(f"{n:,}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for depth, init in sorted(
        {student_of(p) for p in points}, key=lambda s: (-s[0], s[1] != "influence")
    ):
        cost = costs.get(student_label(depth, init, layer_choice=False), {}).get("cost_vs_teacher")
        label = f"`{student_label(depth, init)}`" + (f" ({cost:.2f})" if cost else "")
        present = {variant(p) for p in points if student_of(p) == (depth, init)}
        for loss in sorted(present, key=lambda v: (losses.index(v.split(",")[0]), v)):
            mine = {
                p["queries"]: p
                for p in points
                if student_of(p) == (depth, init) and variant(p) == loss
            }
            if not mine:
                continue
            cells = [
                f"{mine[n]['nll']:.2f} ({mine[n]['rouge_l']:.2f}){gpu_mark(mine[n])}"
                if n in mine
                else ""
                for n in sizes
            ]
            lines.append(f"| {label} | {loss} | " + " | ".join(cells) + " |")
            label = ""
    t = report["teacher"]
    lines.append(f"| teacher (1) | - | {t['nll']:.2f} (1) |" + " |" * (len(sizes) - 1))
    lines.append("")
    lines.append(
        "Cells: held-out NLL of the teacher's greedy answers, nats/token (ROUGE-L of the student's greedy "
        "answers against them); columns: teacher queries (0: the untrained pruned student)."
        + (
            " †: trained and measured on a GPU (float32; the point records which GPU and whether TF32 "
            "products were on), every other point on 2 CPU cores."
            if any(gpu_mark(p) for p in points)
            else ""
        )
    )
    coherent = sorted(
        (p for p in points if "rep4" in p and p["queries"]),
        key=lambda p: (-p["depth"], student_of(p)[1] != "influence", variant(p), p["queries"]),
    )
    lines += [
        "",
        "| student | loss | teacher queries | held-out NLL | own answers' NLL under the teacher | rep4 |",
        "|---|---|---|---|---|---|",
        f"| teacher, its own greedy answers | - | - | {t['nll']:.2f} | {t['nll_under_teacher']:.2f} | {t['rep4']:.3f} |",
    ]
    lines += [
        f"| `{student_label(*student_of(p))}` | {variant(p)} | {p['queries']:,}{gpu_mark(p)} | "
        f"{p['nll']:.2f} | {p['nll_under_teacher']:.2f} | {p['rep4']:.3f} |"
        for p in coherent
    ]
    return "\n".join(lines) + "\n"


def gpu_mark(p: dict) -> str:
    return "†" if p.get("trained_on", "cpu") != "cpu" else ""


VARIANT_MARKERS = "DvP*XhH<>p"  # hollow markers of the variant points, one per variant line


def plot(report: dict, path: Path) -> None:
    """NLL and ROUGE-L vs teacher queries: colour = student depth, line style = loss; students with
    another layer choice than the default (evenly spaced, a block) faint; the stated power-law fits
    dotted."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker
    import numpy as np

    fig, (ax_nll, ax_rouge) = plt.subplots(1, 2, figsize=(11, 4.4))
    styles = {"sft": "o-", "topk-kd": "s--", "kd": "^-.", "gkd": "d:"}
    depths = sorted({p["depth"] for p in report["points"]})
    colours = {
        d: plt.get_cmap("viridis")(i / max(len(depths) - 1, 1) * 0.85) for i, d in enumerate(depths)
    }
    costs = student_costs()

    def name(depth: int, init: str) -> str:
        cost = costs.get(student_label(depth, init, layer_choice=False), {}).get("cost_vs_teacher")
        return student_label(depth, init) + (f" ({cost:.2f}x cost)" if cost else "")

    variants_seen = 0
    for student in sorted({student_of(p) for p in report["points"]}):
        faint = student[1] != "influence"  # the other layer choices
        for loss in sorted({variant(p) for p in report["points"] if student_of(p) == student}):
            pts = sorted(
                (p for p in report["points"] if student_of(p) == student and variant(p) == loss),
                key=lambda p: p["queries"],
            )
            base = loss.split(",")[0]
            if base not in styles:
                continue
            kw = {
                "color": colours[student[0]],
                "alpha": 0.3 if faint else 1.0,
                "lw": 1 if faint else 1.6,
                "label": None if student[1] == "even" else f"{name(*student)}, {loss}",
            }
            fmt = styles[base]
            if (
                loss != base
            ):  # a variant of the grid's training settings: hollow, a marker of its own
                kw["markerfacecolor"] = "none"
                fmt = VARIANT_MARKERS[variants_seen % len(VARIANT_MARKERS)] + fmt[1:]
                variants_seen += 1
            xs = [p["queries"] for p in pts]
            ax_nll.plot(xs, [p["nll"] for p in pts], fmt, **kw)
            ax_rouge.plot(xs, [p["rouge_l"] for p in pts], fmt, **kw)
            gpu = [p for p in pts if gpu_mark(p)]
            for ax, key in ((ax_nll, "nll"), (ax_rouge, "rouge_l")):  # ringed: trained on a GPU
                ax.scatter(
                    [p["queries"] for p in gpu],
                    [p[key] for p in gpu],
                    s=110,
                    facecolors="none",
                    edgecolors="black",
                    lw=0.8,
                    zorder=3,
                )
    for fit in report["fits"]:  # the stated fit, extrapolated (dotted) to the largest size it names
        if fit["init"] != "influence":
            continue
        xs = np.geomspace(max(fit["fitted_on"]), max(int(n) for n in fit["extrapolated_nll"]), 50)
        if xs[-1] > xs[0]:
            ax_nll.plot(
                xs,
                report["teacher"]["nll"] + fit["B"] * xs ** -fit["alpha"],
                ":",
                color=colours[fit["depth"]],
                lw=0.8,
            )
    t = report["teacher"]
    ax_nll.axhline(t["nll"], color="black", lw=1, label=f"teacher itself ({t['nll']:.2f})")
    ax_nll.axhline(2.0, color="red", lw=1, ls="--", label="target 2.0")
    for ax, name in (
        (ax_nll, "held-out NLL of teacher answers (nats/token)"),
        (ax_rouge, "ROUGE-L vs teacher greedy"),
    ):
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(
            matplotlib.ticker.NullFormatter()
        )  # 2x10^1, 3x10^1, ... overlap
        ax.set_xlabel("teacher queries")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    ax_nll.legend(fontsize=6, loc="upper right")
    fig.suptitle(
        f"Distilling {t['spec']} ({t['parameters'] / 1e6:.0f}M) through its API\nfaint: other layer "
        "choices (evenly spaced, a contiguous block); dotted: fitted power law beyond the last point"
        + ("; ringed: trained on a GPU" if any(gpu_mark(p) for p in report["points"]) else ""),
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
