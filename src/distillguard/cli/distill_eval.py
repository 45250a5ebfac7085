"""``distillguard distill eval``: students against their teacher on held-out prompts. Registered
on ``distill_app`` by :mod:`distillguard.cli.distill`, which stays under ~500 lines this way."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distillguard.cli.common import console, err_console, make_progress
from distillguard.cli.options import option
from distillguard.distill.eval_config import EvalConfig
from distillguard.errors import ConfigError


def eval_cmd(
    student: list[str] = typer.Option(
        ...,
        help="a trained student (a directory from `distill train`, or any spec); "
        "repeat for several, e.g. one per number of teacher queries",
    ),
    teacher: str = option(EvalConfig, "teacher"),
    prompts: str = typer.Option(
        ...,
        help="held-out prompts: FILE.jsonl | FILE.csv | DATASET_DIR (its eval split) | sharegpt",
    ),
    limit: int = option(EvalConfig, "limit"),
    skip: int = option(EvalConfig, "skip"),
    max_new_tokens: int = option(EvalConfig, "max_new_tokens"),
    max_prompt_tokens: int = option(EvalConfig, "max_prompt_tokens"),
    baseline: str | None = option(EvalConfig, "baseline"),
    out: Path | None = typer.Option(
        None, help="write the report as JSON here, and the answers beside it (OUT.answers.jsonl)"
    ),
    answers: Path | None = typer.Option(
        None,
        help="write every answer scored here (JSONL, one line per prompt: the teacher's and each "
        "student's greedy answer, with ROUGE-L); default: beside --out",
    ),
    plot: Path | None = typer.Option(
        None,
        help="learning-curve PNG: quality vs teacher queries (the distinct "
        "training prompts in each student's train_summary.json)",
    ),
) -> None:
    """Measure what a student kept of its teacher: NLL of the teacher's answers, ROUGE-L, speed, and the
    coherence of its own answers (their NLL under the teacher, repeated 4-grams).

    Examples:

      distillguard distill eval --student runs/s1 --prompts runs/c1 --baseline prune:15:mlp896

      distillguard distill eval --student runs/n250 --student runs/n1000 --prompts runs/c1 --plot curve.png
    """
    from rich.table import Table

    from distillguard.distill.evaluate import (
        distinct_prompts,
        evaluate_many,
        learning_curve_plot,
        within_prompt_cap,
        write_answers,
    )
    from distillguard.distill.prompts import load_prompts
    from distillguard.distill.train import load_student
    from distillguard.models import load_model

    EvalConfig(  # the same checks as the pipeline's eval: section
        teacher=teacher,
        limit=limit,
        skip=skip,
        max_new_tokens=max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
        baseline=baseline,
    )
    if answers is None and out is not None:
        answers = out.with_name(out.stem + ".answers.jsonl")
    if Path(prompts).is_dir() and (Path(prompts) / "dataset_dict.json").is_file():
        from datasets import load_from_disk

        messages = distinct_prompts(load_from_disk(prompts)["eval"])[skip : skip + limit]
    else:
        messages = [p.as_messages() for p in load_prompts(prompts, limit=limit, skip=skip)]
    queries = []
    for spec in student:
        summary = Path(spec) / "train_summary.json"
        if summary.is_file():  # students of earlier versions recorded only their examples
            trained = json.loads(summary.read_text())
            queries.append(trained.get("queries", trained["examples"]))
        else:
            queries.append(None)
    if plot is not None and None in queries:
        raise ConfigError(
            f"--plot needs students from `distill train` (no train_summary.json in "
            f"{student[queries.index(None)]})"
        )
    with err_console.status("loading the models ..."):
        models = (
            load_model(teacher, device="cpu"),
            # any model spec; a prune:K student is cut from --teacher, as --baseline is
            [load_model(s, device="cpu", teacher=teacher) for s in student],
            load_student(baseline, teacher) if baseline else None,
        )
    messages, over_cap = within_prompt_cap(models[0], messages, max_prompt_tokens)
    if over_cap and not messages:
        raise ConfigError(
            f"all {over_cap} prompts are over --max-prompt-tokens {max_prompt_tokens}; raise it "
            "(0 keeps every prompt)"
        )
    if over_cap:
        err_console.print(
            f"skipped {over_cap} of {over_cap + len(messages)} prompts over --max-prompt-tokens "
            f"{max_prompt_tokens} (in the teacher's chat template; 0 keeps every prompt)",
            soft_wrap=True,
        )
    with make_progress(
        TextColumn("[bold]eval"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[what]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as progress:
        task = progress.add_task("eval", total=None, what="")

        def on_progress(what: str, done: int, total: int) -> None:
            progress.update(task, completed=done, total=total, what=what)

        reports = evaluate_many(
            models[0],
            models[1],
            messages,
            max_new_tokens=max_new_tokens,
            baseline=models[2],
            on_progress=on_progress,
        )
    table = Table(
        "model",
        "queries",
        "parameters",
        "NLL (nats/tok)",
        "tokens/s",
        "ROUGE-L",
        "exact",
        "own answers' NLL under teacher",
        "rep4",
    )
    rows_out = [("teacher", None, reports[0].teacher), ("baseline", 0, reports[0].baseline)]
    rows_out += [(spec, q, r.student) for spec, q, r in zip(student, queries, reports)]
    for name, q, r in rows_out:
        if r is not None:
            table.add_row(
                name,
                "-" if q is None else f"{q:,}",
                f"{r.parameters:,}",
                f"{r.nll:.3f}",
                f"{r.tokens_per_s:.1f}",
                "-" if r.rouge_l is None else f"{r.rouge_l:.3f}",
                "-" if r.exact_match is None else f"{r.exact_match:.2f}",
                "-" if r.nll_under_teacher is None else f"{r.nll_under_teacher:.3f}",
                "-" if r.rep4 is None else f"{r.rep4:.3f}",
            )
    console.print(table)
    if plot is not None:
        learning_curve_plot(reports, queries, plot)
        err_console.print(f"learning curve in {plot}")
    source = {
        "prompts": prompts,
        "skip": skip,
        "limit": limit,
        "max_prompt_tokens": max_prompt_tokens,
        "over_prompt_cap": over_cap,
    }  # with prompts_sha256: which prompts, exactly
    if answers is not None:
        lines = write_answers(reports, answers)
        source["answers"] = str(answers)
        err_console.print(f"{lines} prompts' answers in {answers}", soft_wrap=True)
    else:
        err_console.print("answers not saved: pass --out or --answers to keep them")
    result = (
        dict(reports[0].to_dict(), source=source)
        if len(reports) == 1
        else [dict(r.to_dict(), queries=q, source=source) for r, q in zip(reports, queries)]
    )
    if out is not None:
        out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
