"""``distill run CONFIG.yaml``: [self-instruct →] harvest → curate → train → eval, each stage cached.

A stage is skipped when its output directory holds a ``stage.json`` whose config hash matches
the stage's configuration and its inputs' hashes; change anything upstream and every stage
after it runs again. Harvest is always called (it resumes by itself and sends nothing already
answered), so an interrupted run simply continues. Teacher requests that still fail after their
retries stop the run before curate (exit 1, ``run.json`` says how many): rerun it, or set
``allow_failures: true`` under ``harvest:`` to go on with the answers received.

Example config::

    out: runs/demo
    harvest: {teacher: http://127.0.0.1:8000/v1, api_key_env: DG_KEY, prompts: sharegpt, limit: 1000,
              max_tokens: 256, top_logprobs: 5}
    curate: {eval_fraction: 0.1}
    train: {student: prune:15:mlp896, epochs: 2}   # loss auto: top-k KD from the harvested logprobs
    eval: {limit: 64, max_new_tokens: 128}

An optional ``self_instruct:`` section (``n``, ``requests_per_round``, ``max_rounds``, ``novelty``,
``seed``, ``seeds`` (a prompt source) with ``seed_limit`` and ``seed_max_chars``, and the
requests' ``max_tokens`` and ``temperature``) first grows new prompts through the same teacher and key as ``harvest``; use
them with ``harvest: {prompts: self-instruct, ...}``. Like harvest it resumes by itself.

``harvest:`` takes every :class:`~distillguard.distill.harvest_config.HarvestConfig` field, e.g.
``max_prompt_tokens: 1024`` (prompts longer than that in ``tokenizer``'s tokens are not sent;
0 sends all), and ``export: run`` (``data.jsonl`` holds the answers to this config's prompts;
``store``: every usable answer in the harvest's store). ``self_instruct:`` takes ``max_tokens``,
``max_prompt_tokens`` and ``tokenizer`` for its requests.

``harvest: {keep_capped: true}`` also keeps the answers cut at ``max_tokens`` (curate keeps them
unless ``curate: {keep_capped: false}``; training leaves out their end-of-turn).

``train`` takes every :class:`~distillguard.distill.train.TrainConfig` field: ``loss: topk-kd``
uses the harvested logprobs; ``loss: kd`` (full logits) and ``loss: gkd`` (on-policy, with
``lmbda``, ``beta``, ``gen_max_new_tokens``) load ``teacher:`` locally, e.g.
``train: {student: prune:11, loss: gkd, teacher: smollm2, lmbda: 0.5}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from distillguard.errors import ConfigError, IncompleteError

STAGES = ("harvest", "curate", "train", "eval")
# harvest: settings the pipeline reads itself; the rest are HarvestConfig's
HARVEST_PIPELINE_KEYS = {
    "prompts",
    "limit",
    "skip",
    "api_key_env",
    "allow_failures",
    "keep_capped",
    "export",
}
# self_instruct: settings of its requests (HarvestConfig's), beside its own and the seeds'
SELF_INSTRUCT_REQUEST_KEYS = ("max_tokens", "max_prompt_tokens", "tokenizer")


def load_config(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no such config file: {path}")
    try:
        config = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(
            f"{path}: not valid YAML ({exc.__class__.__name__}: {str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(config, dict) or "out" not in config or "harvest" not in config:
        raise ConfigError(f"{path}: needs at least `out:` and a `harvest:` section")
    unknown = set(config) - {"out", "self_instruct", *STAGES}
    if unknown:
        raise ConfigError(
            f"{path}: unknown sections {sorted(unknown)}; use out, self_instruct, {', '.join(STAGES)}"
        )
    for name, allowed in _section_keys().items():
        section = config.get(name)
        if section is None:
            continue
        if not isinstance(section, dict):
            raise ConfigError(
                f"{path}: `{name}:` must be a mapping of settings, not {type(section).__name__}"
            )
        if set(section) - allowed:  # caught here, not as a TypeError after the harvest has run
            raise ConfigError(
                f"{path}: unknown `{name}` settings {sorted(set(section) - allowed)}; "
                f"use {', '.join(sorted(allowed))}"
            )
    missing = [k for k in ("teacher", "prompts") if k not in (config["harvest"] or {})]
    if missing:
        raise ConfigError(f"{path}: `harvest:` needs {' and '.join(missing)}")
    if config["harvest"]["prompts"] == "self-instruct" and "self_instruct" not in config:
        raise ConfigError(f"{path}: `prompts: self-instruct` needs a `self_instruct:` section")
    if "eval" in config and "train" not in config:
        raise ConfigError(
            f"{path}: `eval:` evaluates the trained student, so it needs a `train:` section"
        )
    _check_values(path, config)
    return config


def _check_values(path: Path, config: dict) -> None:
    """Build each stage's config once now, so a bad value fails before hours of harvest, not after."""
    from distillguard.distill.curate import CurateConfig
    from distillguard.distill.harvest_config import HarvestConfig
    from distillguard.distill.train_config import TrainConfig

    checks = [
        (
            "harvest",
            lambda: HarvestConfig(
                **{k: v for k, v in config["harvest"].items() if k not in HARVEST_PIPELINE_KEYS}
            ),
        ),
        (
            "curate",
            lambda: CurateConfig(
                **{k: v for k, v in (config.get("curate") or {}).items() if k != "eval_prompts"}
            ),
        ),
    ]
    if "train" in config:
        checks.append(("train", lambda: TrainConfig(data="", out="", **(config["train"] or {}))))
    if "eval" in config:
        from distillguard.distill.eval_config import EvalConfig

        checks.append(("eval", lambda: EvalConfig(**(config["eval"] or {}))))
    if config.get("self_instruct"):
        from distillguard.distill.selfinstruct import SelfInstructConfig

        own = {
            f for f in SelfInstructConfig.model_fields if f != "seeds"
        }  # seeds: a prompt source here
        checks.append(
            (
                "self_instruct",
                lambda: SelfInstructConfig(
                    **{k: v for k, v in config["self_instruct"].items() if k in own}
                ),
            )
        )
    from distillguard.distill.store import check_export_scope

    checks.append(("harvest", lambda: check_export_scope(config["harvest"].get("export", "run"))))
    for section, build in checks:
        try:
            build()
        except (
            ConfigError
        ) as exc:  # the message names the CLI flag; the YAML key is the same with underscores
            raise ConfigError(f"{path}: `{section}:` {exc}") from None
        except TypeError as exc:  # e.g. a string where a number belongs
            raise ConfigError(
                f"{path}: `{section}:` a setting has the wrong type ({exc})"
            ) from None


def _section_keys() -> dict[str, set[str]]:
    """The settings each section takes: its config class's fields plus what the pipeline reads itself."""
    from distillguard.distill.curate import CurateConfig
    from distillguard.distill.eval_config import EvalConfig
    from distillguard.distill.harvest_config import HarvestConfig
    from distillguard.distill.selfinstruct import SelfInstructConfig
    from distillguard.distill.train_config import TrainConfig

    def names(cls) -> set[str]:
        return set(cls.model_fields)

    return {
        "harvest": names(HarvestConfig) | HARVEST_PIPELINE_KEYS,
        "self_instruct": names(SelfInstructConfig)
        | {"seed_limit", "seed_max_chars", "temperature", *SELF_INSTRUCT_REQUEST_KEYS},
        "curate": names(CurateConfig) | {"eval_prompts"},
        "train": names(TrainConfig) - {"data", "out"},
        "eval": names(EvalConfig),
    }


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _cached(stage_dir: Path, key: str) -> bool:
    marker = stage_dir / "stage.json"
    return marker.is_file() and json.loads(marker.read_text()).get("key") == key


def _mark(stage_dir: Path, key: str, result: dict) -> None:
    (stage_dir / "stage.json").write_text(
        json.dumps({"key": key, "result": result}, indent=2, default=str)
    )


def run(config: dict, *, log=print) -> dict:
    from distillguard.distill.curate import CurateConfig, curate, read_jsonl, save_dataset
    from distillguard.distill.harvest import HarvestConfig, harvest, run_stoppable
    from distillguard.distill.prompts import load_prompts
    from distillguard.distill.store import ResponseStore
    from distillguard.distill.train import TrainConfig, train

    out = Path(config["out"])
    results: dict = {}
    # harvest (resumable by itself)
    h = dict(config["harvest"])
    source, limit, skip = h.pop("prompts"), h.pop("limit", None), h.pop("skip", 0)
    allow_failures = bool(h.pop("allow_failures", False))
    keep_capped = bool(h.pop("keep_capped", False))
    export = h.pop("export", "run")
    key_env = h.pop("api_key_env", None)
    if key_env:
        h["api_key"] = os.environ.get(key_env) or _missing(key_env)
    if "self_instruct" in config:
        tasks = _self_instruct(dict(config["self_instruct"] or {}), h, out / "self_instruct", log)
        if source == "self-instruct":
            source = str(tasks)
        results["self_instruct"] = json.loads((out / "self_instruct" / "report.json").read_text())
    hdir = out / "harvest"
    hdir.mkdir(parents=True, exist_ok=True)
    store = ResponseStore(hdir / "store.sqlite")
    hconfig = HarvestConfig(**h)
    report = run_stoppable(harvest(hconfig, load_prompts(source, limit=limit, skip=skip), store))
    exported = store.export(
        hdir / "data.jsonl", keep_capped=keep_capped, run=report.fingerprints, scope=export
    )
    store.close()
    results["harvest"] = {**report.to_dict(), "data_rows": exported.rows, "export": vars(exported)}
    log(
        f"harvest: {report.stored_ok} new, {report.skipped_done} cached, {exported.rows} rows"
        + (
            f", {report.over_prompt_cap} prompts over max_prompt_tokens {hconfig.max_prompt_tokens}"
            " skipped"
            if report.over_prompt_cap
            else ""
        )
    )
    for line in exported.describe(hconfig.max_tokens):
        log(f"harvest: {line}")
    if report.unfinished() and not allow_failures:
        # Curating and training on what a passing outage left would cost hours for a student of the
        # wrong data; a rerun fills the gap, then every later stage runs once on the whole harvest.
        (out / "run.json").write_text(json.dumps(results, indent=2, default=str))
        raise IncompleteError(
            f"harvest: {report.unfinished()}; the later stages did not run "
            "(set `allow_failures: true` under harvest: to go on with the answers you have)"
        )
    upstream = _file_hash(hdir / "data.jsonl")
    # curate
    c = dict(config.get("curate") or {})
    if (
        keep_capped
    ):  # harvested to be used: curate keeps them too unless its own section says otherwise
        c.setdefault("keep_capped", True)
    cdir = out / "curate"
    key = _hash({"curate": c, "input": upstream})
    if not _cached(cdir, key):
        eval_source = c.pop("eval_prompts", None)
        evals = (
            [
                "\n".join(t for r, t in p.messages if r != "system")
                for p in load_prompts(eval_source)
            ]
            if eval_source
            else []
        )
        train_rows, eval_rows, creport = curate(
            read_jsonl(hdir / "data.jsonl"), CurateConfig(**c), eval_prompts=evals
        )
        save_dataset(train_rows, eval_rows, cdir)
        _mark(cdir, key, creport.to_dict())
        log(f"curate: {creport.train} train, {creport.eval} eval, removed {creport.removed}")
    results["curate"] = json.loads((cdir / "stage.json").read_text())["result"]
    # train
    if "train" in config:
        t = dict(config["train"] or {})
        tdir = out / "student"
        key = _hash({"train": t, "input": key})
        if not _cached(tdir, key):
            summary = train(TrainConfig(data=str(cdir), out=str(tdir), **t))
            _mark(tdir, key, {k: v for k, v in summary.items() if k != "history"})
            log(f"train: {summary['steps']} steps, final loss {summary['final_loss']:.3f}")
            if summary.get("length_message"):
                log(f"train: {summary['length_message']}")
        results["train"] = json.loads((tdir / "stage.json").read_text())["result"]
        # eval
        if "eval" in config:
            e = dict(config["eval"] or {})
            edir = out / "eval"
            edir.mkdir(parents=True, exist_ok=True)
            key = _hash({"eval": e, "input": key})
            if not _cached(edir, key):
                from datasets import load_from_disk

                from distillguard.distill.eval_config import EvalConfig
                from distillguard.distill.evaluate import (
                    distinct_prompts,
                    evaluate,
                    within_prompt_cap,
                    write_answers,
                )
                from distillguard.distill.train import load_student
                from distillguard.models import load_model

                # the teacher the student was trained from, unless the section names another
                e.setdefault(
                    "teacher", TrainConfig(data="", out="", **(config["train"] or {})).teacher
                )
                ec = EvalConfig(**e)
                messages = distinct_prompts(load_from_disk(str(cdir))["eval"])
                teacher = load_model(ec.teacher, device="cpu")
                messages, over_cap = within_prompt_cap(
                    teacher, messages[ec.skip : ec.skip + ec.limit], ec.max_prompt_tokens
                )
                ereport = evaluate(
                    teacher,
                    load_model(str(tdir), device="cpu"),
                    messages,
                    max_new_tokens=ec.max_new_tokens,
                    baseline=load_student(ec.baseline, ec.teacher) if ec.baseline else None,
                )
                write_answers([ereport], edir / "answers.jsonl")
                _mark(
                    edir,
                    key,
                    {
                        **ereport.to_dict(),
                        "over_prompt_cap": over_cap,
                        "answers": str(edir / "answers.jsonl"),
                    },
                )
                if over_cap:
                    log(f"eval: skipped {over_cap} prompts over max_prompt_tokens")
                log(
                    f"eval: student NLL {ereport.student.nll:.3f} vs teacher {ereport.teacher.nll:.3f}, "
                    f"ROUGE-L {ereport.student.rouge_l:.3f}"
                )
            results["eval"] = json.loads((edir / "stage.json").read_text())["result"]
    (out / "run.json").write_text(json.dumps(results, indent=2, default=str))
    return results


def _self_instruct(s: dict, h: dict, sdir: Path, log) -> Path:
    """Run the self-instruct stage (resumable by itself); the path of its prompt file."""
    from distillguard.distill.harvest import HarvestConfig, run_stoppable
    from distillguard.distill.selfinstruct import (
        SEED_LIMIT,
        SEED_MAX_CHARS,
        SELF_INSTRUCT_MAX_TOKENS,
        SELF_INSTRUCT_TEMPERATURE,
        SelfInstructConfig,
        load_seed_tasks,
        self_instruct,
        write_prompts,
    )
    from distillguard.distill.store import ResponseStore

    seeds, seed_limit, seed_max_chars = (
        s.pop("seeds", None),
        s.pop("seed_limit", SEED_LIMIT),
        s.pop("seed_max_chars", SEED_MAX_CHARS),
    )
    if seeds:
        s["seeds"] = load_seed_tasks(seeds, limit=seed_limit, max_chars=seed_max_chars)
    shared = {
        k: h[k]
        for k in ("teacher", "api_key", "model", "concurrency", "timeout_s", "max_retries")
        if k in h
    }
    hconfig = HarvestConfig(
        **shared,
        **{k: s.pop(k) for k in SELF_INSTRUCT_REQUEST_KEYS if k in s and k != "max_tokens"},
        max_tokens=s.pop("max_tokens", SELF_INSTRUCT_MAX_TOKENS),
        temperature=s.pop("temperature", SELF_INSTRUCT_TEMPERATURE),
    )
    sdir.mkdir(parents=True, exist_ok=True)
    store = ResponseStore(sdir / "store.sqlite")
    try:
        tasks, report = run_stoppable(self_instruct(SelfInstructConfig(**s), hconfig, store))
    finally:
        store.close()
    write_prompts(tasks, sdir / "prompts.jsonl")
    (sdir / "report.json").write_text(json.dumps(report.to_dict(), indent=2))
    log(
        f"self-instruct: {len(tasks)} tasks after {report.rounds} rounds (stopped: {report.stopped})"
    )
    if report.stopped == "failed":  # the harvest would run on a pool a rerun cannot rebuild
        raise IncompleteError(
            f"self-instruct round {report.rounds}: {report.unfinished}; the later stages did not run"
        )
    return sdir / "prompts.jsonl"


def _file_hash(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _missing(name: str):
    raise ConfigError(f"environment variable {name} (api_key_env) is not set")
