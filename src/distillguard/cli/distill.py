"""``distillguard distill``: self-instruct, harvest, curate, train, eval and run (all of them)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from distillguard.cli.common import err_console, make_progress
from distillguard.cli.distill_eval import eval_cmd
from distillguard.cli.options import option
from distillguard.distill.curate import CurateConfig
from distillguard.distill.harvest_config import HarvestConfig
from distillguard.distill.scrub import Scrub
from distillguard.distill.selfinstruct import (
    SEED_LIMIT,
    SEED_MAX_CHARS,
    SELF_INSTRUCT_MAX_TOKENS,
    SELF_INSTRUCT_TEMPERATURE,
    SelfInstructConfig,
)
from distillguard.distill.train_config import TrainConfig
from distillguard.errors import IncompleteError

distill_app = typer.Typer(
    help="Distil a teacher into a student: harvest, ...", no_args_is_help=True
)


@distill_app.command("harvest")
def harvest_cmd(
    teacher: str = option(HarvestConfig, "teacher"),
    api_key: str | None = option(HarvestConfig, "api_key", envvar="DISTILLGUARD_TEACHER_API_KEY"),
    prompts: str = typer.Option(
        ..., help="prompt source: FILE.jsonl | FILE.csv | FILE.parquet | DATASET_DIR | sharegpt"
    ),
    out: Path = typer.Option(..., help="output directory (the store makes reruns resume)"),
    model: str = option(HarvestConfig, "model"),
    limit: int | None = typer.Option(None, help="use at most this many prompts"),
    skip: int = typer.Option(0, help="skip the first prompts (e.g. a held-out split)"),
    n: int = option(HarvestConfig, "n"),
    concurrency: int = option(HarvestConfig, "concurrency"),
    max_tokens: int = option(HarvestConfig, "max_tokens"),
    temperature: float = option(HarvestConfig, "temperature"),
    max_prompt_tokens: int = option(HarvestConfig, "max_prompt_tokens"),
    tokenizer: str = option(HarvestConfig, "tokenizer"),
    top_logprobs: int | None = option(HarvestConfig, "top_logprobs"),
    seed: int | None = option(HarvestConfig, "seed"),
    budget_tokens: int | None = option(HarvestConfig, "budget_tokens"),
    budget_usd: float | None = option(HarvestConfig, "budget_usd"),
    price_in: float = option(HarvestConfig, "price_in"),
    price_out: float = option(HarvestConfig, "price_out"),
    timeout: float = option(HarvestConfig, "timeout_s"),
    max_retries: int = option(HarvestConfig, "max_retries"),
    commit_window: float = option(HarvestConfig, "commit_window_s"),
    keep_capped: bool = typer.Option(
        False,
        "--keep-capped",
        help="also write answers cut at --max-tokens to "
        "data.jsonl (finish_reason 'length'; `distill curate --keep-capped` keeps them)",
    ),
    export: str = typer.Option(
        "run",
        help="what data.jsonl holds: run (the answers to this command's prompts, whichever run "
        "stored them) | store (every usable answer in OUT's store, earlier runs of other "
        "prompts or settings included)",
    ),
) -> None:
    """Collect teacher answers: async, resumable after a crash, never over budget.

    Writes OUT/store.sqlite (every paid answer, keyed by request fingerprint), OUT/data.jsonl
    (the usable answers to this command's prompts; --export store: all in the store) and
    OUT/report.json. Rerun the same command to resume. Exits 1 when requests failed after their
    retries (the rest is stored): rerun to send just those.

    Examples:

      distillguard distill harvest --teacher http://127.0.0.1:8000/v1 --api-key $KEY --prompts sharegpt --limit 1000 --out runs/h1

      distillguard distill harvest --teacher $URL --prompts prompts.jsonl --out runs/h2 --top-logprobs 5 --budget-usd 5 --price-in 0.15 --price-out 0.6
    """
    from distillguard.distill import ResponseStore, harvest, load_prompts
    from distillguard.distill.harvest import run_stoppable

    config = HarvestConfig(
        teacher=teacher,
        api_key=api_key,
        model=model,
        n=n,
        concurrency=concurrency,
        max_tokens=max_tokens,
        temperature=temperature,
        max_prompt_tokens=max_prompt_tokens,
        tokenizer=tokenizer,
        top_logprobs=top_logprobs,
        seed=seed,
        budget_tokens=budget_tokens,
        budget_usd=budget_usd,
        price_in=price_in,
        price_out=price_out,
        timeout_s=timeout,
        max_retries=max_retries,
        commit_window_s=commit_window,
    )
    from distillguard.distill.store import check_export_scope

    check_export_scope(export)  # before anything is paid for
    items = load_prompts(prompts, limit=limit, skip=skip)
    out.mkdir(parents=True, exist_ok=True)
    store = ResponseStore(out / "store.sqlite")
    columns = [
        TextColumn("[bold]harvest"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "{task.fields[tokens]:,} tok  ${task.fields[usd]:.4f}  {task.fields[rate]:.1f} req/s"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with make_progress(*columns) as progress:
        task = progress.add_task("harvest", total=len(items), tokens=0, usd=0.0, rate=0.0)
        t0 = time.perf_counter()

        def on_progress(report, budget) -> None:
            finished = report.finished()
            elapsed = max(time.perf_counter() - t0, 1e-9)
            progress.update(
                task,
                completed=finished,
                tokens=budget.tokens,
                usd=budget.usd,
                rate=(finished - report.skipped_done) / elapsed,
            )

        report = run_stoppable(harvest(config, items, store, on_progress=on_progress))
    exported = store.export(
        out / "data.jsonl", keep_capped=keep_capped, run=report.fingerprints, scope=export
    )
    summary = {
        **report.to_dict(),
        "store": store.totals(),
        "data_rows": exported.rows,
        "export": vars(exported),
    }
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    store.close()
    for line in harvest_summary(report, exported, config):
        err_console.print(line, soft_wrap=True)
    print(json.dumps(summary))
    if (
        report.unfinished()
    ):  # exit 1, after everything above is written: a script must not take this as done
        raise IncompleteError(report.unfinished())


def harvest_summary(report, exported, config: HarvestConfig) -> list[str]:
    """What the harvest did, then what data.jsonl holds and what it left out, each named."""
    from distillguard.distill.prompt_length import over_cap_message

    new = report.stored_ok + sum(report.malformed.values())  # paid for, usable or not
    answers = f" of {config.n} answers each" if config.n > 1 else ""
    lines = [
        f"stored {new} new responses{answers} ({report.skipped_done} more from earlier runs), "
        f"failed {sum(report.failed.values())}, over budget {report.budget_stopped}"
    ]
    if report.over_prompt_cap:
        lines.append(
            over_cap_message(
                report.over_prompt_cap, config.max_prompt_tokens, report.planned, config.tokenizer
            )
        )
    if report.repeated:
        lines.append(
            f"{report.repeated} prompts repeat an earlier prompt of this run word for word: "
            "asked once, answered once"
        )
    return lines + exported.describe(config.max_tokens)


@distill_app.command("self-instruct")
def self_instruct_cmd(
    teacher: str = option(HarvestConfig, "teacher"),
    api_key: str | None = option(HarvestConfig, "api_key", envvar="DISTILLGUARD_TEACHER_API_KEY"),
    out: Path = typer.Option(
        ..., help="output directory: OUT/prompts.jsonl, OUT/store.sqlite (reruns resume)"
    ),
    n: int = option(SelfInstructConfig, "n"),
    seeds: str | None = typer.Option(
        None,
        help="seed tasks (any prompt source: FILE.jsonl | FILE.csv | ... | "
        "sharegpt with --seed-limit); default: 24 built-in tasks",
    ),
    seed_limit: int = typer.Option(
        SEED_LIMIT, help="use at most this many seed tasks from --seeds"
    ),
    seed_max_chars: int = typer.Option(
        SEED_MAX_CHARS, help="use only seed tasks up to this long (a listing shows 8 tasks)"
    ),
    model: str = option(HarvestConfig, "model"),
    requests_per_round: int = option(SelfInstructConfig, "requests_per_round"),
    max_rounds: int = option(SelfInstructConfig, "max_rounds"),
    novelty: float = option(SelfInstructConfig, "novelty"),
    concurrency: int = option(HarvestConfig, "concurrency"),
    max_tokens: int = typer.Option(
        SELF_INSTRUCT_MAX_TOKENS, help="max completion tokens per answer (a few tasks)"
    ),
    max_prompt_tokens: int = option(HarvestConfig, "max_prompt_tokens"),
    tokenizer: str = option(HarvestConfig, "tokenizer"),
    temperature: float = typer.Option(SELF_INSTRUCT_TEMPERATURE, help="sampling temperature"),
    budget_tokens: int | None = option(HarvestConfig, "budget_tokens"),
    budget_usd: float | None = option(HarvestConfig, "budget_usd"),
    price_in: float = option(HarvestConfig, "price_in"),
    price_out: float = option(HarvestConfig, "price_out"),
    seed: int = option(SelfInstructConfig, "seed"),
    timeout: float = option(HarvestConfig, "timeout_s"),
    max_retries: int = option(HarvestConfig, "max_retries"),
) -> None:
    """Bootstrap new prompts from seed tasks through the teacher itself (Self-Instruct, Alpaca).

    Writes OUT/prompts.jsonl for `distill harvest --prompts`. Rerun the same command to resume:
    stored answers rebuild the pool, nothing already answered is sent again. A round whose
    requests failed after their retries ends the run with exit 1 (stopped: failed): rerun.

    Examples:

      distillguard distill self-instruct --teacher http://127.0.0.1:8000/v1 --api-key $KEY --out runs/si --n 500

      distillguard distill harvest --teacher http://127.0.0.1:8000/v1 --api-key $KEY --prompts runs/si/prompts.jsonl --out runs/h1
    """
    from distillguard.distill import ResponseStore
    from distillguard.distill.harvest import run_stoppable
    from distillguard.distill.selfinstruct import (
        SEED_TASKS,
        load_seed_tasks,
        self_instruct,
        write_prompts,
    )

    seed_tasks = (
        load_seed_tasks(seeds, limit=seed_limit, max_chars=seed_max_chars) if seeds else SEED_TASKS
    )
    config = SelfInstructConfig(
        n=n,
        seeds=seed_tasks,
        requests_per_round=requests_per_round,
        max_rounds=max_rounds,
        novelty=novelty,
        seed=seed,
    )
    hconfig = HarvestConfig(
        teacher=teacher,
        api_key=api_key,
        model=model,
        concurrency=concurrency,
        max_tokens=max_tokens,
        max_prompt_tokens=max_prompt_tokens,
        tokenizer=tokenizer,
        temperature=temperature,
        budget_tokens=budget_tokens,
        budget_usd=budget_usd,
        price_in=price_in,
        price_out=price_out,
        timeout_s=timeout,
        max_retries=max_retries,
    )
    out.mkdir(parents=True, exist_ok=True)
    store = ResponseStore(out / "store.sqlite")
    columns = [
        TextColumn("[bold]self-instruct"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "round {task.fields[round]}  {task.fields[requests]} answers  {task.fields[candidates]} "
            "candidates"
        ),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ]
    with make_progress(*columns) as progress:
        task = progress.add_task("self-instruct", total=n, round=0, requests=0, candidates=0)

        def on_round(report, tasks) -> None:
            progress.update(
                task,
                completed=len(tasks),
                round=report.rounds,
                requests=report.requests,
                candidates=report.candidates,
            )

        tasks, report = run_stoppable(self_instruct(config, hconfig, store, on_round=on_round))
    write_prompts(tasks, out / "prompts.jsonl")
    summary = {**report.to_dict(), "store": store.totals()}
    (out / "report.json").write_text(json.dumps(summary, indent=2))
    store.close()
    err_console.print(
        f"{len(tasks)} new tasks in {out / 'prompts.jsonl'} after {report.rounds} rounds "
        f"({report.candidates} candidates; dropped {report.dropped}; stopped: {report.stopped})"
    )
    if report.harvest.get("over_prompt_cap"):
        from distillguard.distill.prompt_length import over_cap_message

        err_console.print(
            over_cap_message(
                report.harvest["over_prompt_cap"],
                max_prompt_tokens,
                report.harvest["planned"],
                tokenizer,
            ),
            soft_wrap=True,
        )
    print(json.dumps(summary))
    if report.stopped == "failed":
        raise IncompleteError(f"round {report.rounds}: {report.unfinished}")


@distill_app.command("curate")
def curate_cmd(
    data: Path = typer.Option(..., help="harvested data.jsonl (from `distill harvest`)"),
    out: Path = typer.Option(..., help="output directory: an HF datasets DatasetDict (train/eval)"),
    eval_prompts: str | None = typer.Option(
        None, help="evaluation prompts (any prompt source) to decontaminate against"
    ),
    near_dup: float = option(
        CurateConfig,
        "near_dup_threshold",
        help="near-duplicate Jaccard threshold (MinHash); 1 keeps near-duplicates",
    ),
    dedup_on: str = option(CurateConfig, "dedup_on"),
    min_chars: int = option(CurateConfig, "min_chars"),
    max_chars: int | None = option(CurateConfig, "max_chars"),
    drop_refusals: bool = option(CurateConfig, "drop_refusals", "--drop-refusals/--keep-refusals"),
    keep_capped: bool = option(CurateConfig, "keep_capped", "--keep-capped"),
    verifier: str | None = option(CurateConfig, "verifier"),
    eval_fraction: float = option(CurateConfig, "eval_fraction"),
    seed: int = option(CurateConfig, "seed"),
    scrub_delete: float = option(Scrub, "scrub_delete"),
    scrub_substitute: float = option(Scrub, "scrub_substitute"),
    scrub_swap: float = option(Scrub, "scrub_swap"),
    scrub_reorder: float = option(Scrub, "scrub_reorder"),
    scrub_truncate: int | None = option(Scrub, "scrub_truncate"),
    mix_other: float = option(Scrub, "mix_other"),
    drop_outliers: float = option(Scrub, "drop_outliers"),
    outlier_score: str = option(Scrub, "outlier_score"),
    scrub_model: str = option(Scrub, "scrub_model"),
    scrub_seed: int = option(Scrub, "scrub_seed"),
) -> None:
    """Deduplicate, filter, decontaminate and split harvested answers into a training set.

    The --scrub-*, --mix-other and --drop-outliers options play a distiller who hides the
    teacher's watermark and canaries (distill/scrub.py): outliers dropped first, then each
    answer edited, then other-model answers mixed in, all before the filters above.

    Examples:

      distillguard distill curate --data runs/h1/data.jsonl --out runs/c1

      distillguard distill curate --data runs/h1/data.jsonl --out runs/c1 --eval-prompts heldout.jsonl --verifier checks:math_ok

      distillguard distill curate --data runs/h1/data.jsonl --out runs/c2 --scrub-delete 0.25 --mix-other 0.5 --drop-outliers 0.05
    """
    from distillguard.distill.curate import curate, read_jsonl, save_dataset
    from distillguard.distill.prompts import load_prompts

    # every scrub option is the Scrub field of its name
    scrub = Scrub(**{k: v for k, v in locals().items() if k in Scrub.model_fields})

    config = CurateConfig(
        min_chars=min_chars,
        max_chars=max_chars,
        drop_refusals=drop_refusals,
        verifier=verifier,
        near_dup_threshold=None if near_dup == 1 else near_dup,
        dedup_on=dedup_on,
        eval_fraction=eval_fraction,
        seed=seed,
        keep_capped=keep_capped,
    )
    evals = (
        ["\n".join(c for r, c in p.messages if r != "system") for p in load_prompts(eval_prompts)]
        if eval_prompts
        else []
    )
    with err_console.status("curating ..."):
        train, evaluation, report = curate(
            read_jsonl(data), config, eval_prompts=evals, scrub=scrub
        )
        save_dataset(train, evaluation, out)
    (out / "curate_report.json").write_text(json.dumps(report.to_dict(), indent=2))
    if report.scrub:
        err_console.print(report.scrub["summary"], soft_wrap=True, highlight=False)
    err_console.print(
        f"kept {report.train} train + {report.eval} eval of {report.read}; removed {report.removed}"
    )
    print(json.dumps(report.to_dict()))


@distill_app.command("train")
def train_cmd(
    data: Path = option(TrainConfig, "data"),
    out: Path = option(TrainConfig, "out"),
    student: str = option(TrainConfig, "student"),
    teacher: str = option(TrainConfig, "teacher"),
    loss: str = option(TrainConfig, "loss"),
    ce_weight: float = option(TrainConfig, "ce_weight"),
    unlikelihood: float | None = option(TrainConfig, "unlikelihood"),
    beta: float | None = option(TrainConfig, "beta"),
    lmbda: float = option(TrainConfig, "lmbda"),
    gen_max_new_tokens: int = option(TrainConfig, "gen_max_new_tokens"),
    lora: bool = option(TrainConfig, "lora", "--lora"),
    epochs: float = option(TrainConfig, "epochs"),
    lr: float = option(TrainConfig, "lr"),
    batch_size: int = option(TrainConfig, "batch_size"),
    max_length: int = option(TrainConfig, "max_length"),
    max_train: int | None = option(TrainConfig, "max_train"),
    seed: int = option(TrainConfig, "seed"),
    save_steps: int = option(TrainConfig, "save_steps"),
    resume: bool = option(TrainConfig, "resume", "--resume/--no-resume"),
    precision: str = option(TrainConfig, "precision"),
) -> None:
    """Train a student on curated teacher answers (HF Trainer: accelerate/FSDP/DeepSpeed on GPUs).

    After a crash, the same command continues from the last checkpoint (every --save-steps); once
    the student is saved, the same command does nothing.

    Examples:

      distillguard distill train --data runs/c1 --out runs/s1 --student prune:15:mlp896

      distillguard distill train --data runs/c1 --out runs/s2 --student prune:12 --loss topk-kd --epochs 3

      distillguard distill train --data runs/c1 --out runs/s3 --student prune:11 --loss kd --teacher smollm2

      distillguard distill train --data runs/c1 --out runs/s4 --student prune:11 --loss gkd --lmbda 0.5 --beta 0.5
    """
    from distillguard.distill.train import ProgressCallback, train

    # every option of this command is the TrainConfig field of its name
    settings = {k: v for k, v in locals().items() if k in TrainConfig.model_fields}
    config = TrainConfig(**{**settings, "data": str(data), "out": str(out)})

    with make_progress(
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    ) as progress:
        summary = train(config, callbacks=[ProgressCallback(progress)])
    if summary.get("already_trained"):
        err_console.print(
            f"{out} already holds this run's student (same settings, data and starting point); "
            "nothing to do (--no-resume trains it again)"
        )
    else:
        err_console.print(
            f"saved {summary['parameters']:,}-parameter student to {out} "
            f"({summary['steps']} steps, final loss {summary['final_loss']:.3f})"
        )
    if summary.get("length_message"):  # also in OUT/train_summary.json
        err_console.print(
            f"{summary['examples']} examples of {summary['training_rows']} rows: "
            f"{summary['length_message']}",
            soft_wrap=True,
        )
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}))


distill_app.command("eval")(eval_cmd)


@distill_app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="pipeline YAML (see `distillguard.distill.pipeline`)"),
) -> None:
    """Run harvest → curate → train → eval from one YAML config; finished stages are cached.

    Example config:

      out: runs/demo
      harvest: {teacher: http://127.0.0.1:8000/v1, api_key_env: DG_KEY, prompts: sharegpt, limit: 1000}
      curate: {eval_fraction: 0.1}
      train: {student: "prune:15:mlp896", epochs: 2}   # loss auto (top-k KD | sft); or kd | gkd (teacher: smollm2)
      eval: {limit: 64, max_new_tokens: 128}
    """
    from distillguard.distill.pipeline import load_config, run

    results = run(load_config(config), log=err_console.print)
    print(json.dumps(results, default=str))
