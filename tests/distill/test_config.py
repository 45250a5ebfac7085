"""The distill stages' configs: one definition per setting (default and help) shared by the Python
API, the pipeline's YAML and the CLI; fingerprints of runs and requests unchanged by the move
from dataclasses to pydantic."""

from __future__ import annotations

import click
import pytest
import typer
import typer.main

from distillguard.cli.distill import distill_app
from distillguard.cli.options import option
from distillguard.distill.curate import CurateConfig
from distillguard.distill.eval_config import EvalConfig
from distillguard.distill.harvest_config import HarvestConfig
from distillguard.distill.prompts import Prompt
from distillguard.distill.selfinstruct import SelfInstructConfig
from distillguard.distill.store import fingerprint
from distillguard.distill.train import run_fingerprint
from distillguard.distill.train_config import TrainConfig
from distillguard.errors import ConfigError

# command -> (config, CLI parameter -> field where the names differ (None: not the field of that
# name), parameters whose help is the CLI's own because the CLI spells the value differently)
COMMANDS = {
    "train": (TrainConfig, {}, set()),
    "harvest": (
        HarvestConfig,
        {"timeout": "timeout_s", "commit_window": "commit_window_s"},
        set(),
    ),
    "self-instruct": (SelfInstructConfig, {"seeds": None}, set()),  # --seeds: a prompt source
    "curate": (CurateConfig, {"near_dup": "near_dup_threshold"}, {"near_dup"}),
    "eval": (EvalConfig, {}, set()),
}
# self-instruct's harvest options come from HarvestConfig
SELF_INSTRUCT_HARVEST = {
    "teacher",
    "api_key",
    "model",
    "concurrency",
    "max_prompt_tokens",
    "tokenizer",
    "budget_tokens",
    "budget_usd",
    "price_in",
    "price_out",
    "timeout",
    "max_retries",
}


def drift(command: click.Command, model, aliases: dict, own_help: set) -> list[str]:
    """Every option of ``command`` that names a field of ``model`` but differs from it in default
    or help; and each option compared, so a test can check something was."""
    problems, compared = [], []
    for param in command.params:
        name = aliases.get(param.name, param.name)
        if name is None or name not in model.model_fields:
            continue
        field = model.model_fields[name]
        compared.append(param.name)
        want = None if field.is_required() else field.get_default(call_default_factory=True)
        if param.default != want or param.required != field.is_required():
            problems.append(f"--{param.name}: default {param.default!r}, config {want!r}")
        if param.name not in own_help and getattr(param, "help", None) != field.description:
            problems.append(f"--{param.name}: help {param.help!r}, config {field.description!r}")
    return problems if problems else compared


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_cli_defaults_and_help_are_the_configs(name):
    commands = typer.main.get_command(distill_app).commands
    model, aliases, own_help = COMMANDS[name]
    command = commands[name]
    if name == "self-instruct":
        harvest = [p for p in command.params if p.name in SELF_INSTRUCT_HARVEST]
        command = click.Command(name, params=[p for p in command.params if p not in harvest])
        compared = drift(
            click.Command("h", params=harvest), HarvestConfig, {"timeout": "timeout_s"}, set()
        )
        assert sorted(compared) == sorted(SELF_INSTRUCT_HARVEST), compared
    compared = drift(command, model, aliases, own_help)
    # a list of option names means no drift; at least the options that used to restate defaults
    assert all(not c.startswith("--") for c in compared), compared
    assert len(compared) >= {"train": 18, "harvest": 16, "curate": 8, "eval": 5}.get(name, 5)


def test_the_drift_check_catches_a_restated_default():
    """The comparison above fails where a default or help is written out again and differs."""
    app = typer.Typer()

    @app.command()
    def cmd(
        epochs: float = typer.Option(3.0, help="passes over the training set"),
        lr: float = option(TrainConfig, "lr"),
        seed: int = typer.Option(0, help="the seed"),
    ) -> None: ...

    problems = drift(typer.main.get_command(app), TrainConfig, {}, set())
    assert problems == [
        "--epochs: default 3.0, config 2.0",
        "--seed: help 'the seed', config 'random seed'",
    ]


def test_option_reads_default_help_and_requiredness_from_the_field():
    app = typer.Typer()

    @app.command()
    def cmd(
        data: str = option(TrainConfig, "data"),
        resume: bool = option(TrainConfig, "resume", "--resume/--no-resume"),
        max_train: int | None = option(TrainConfig, "max_train"),
    ) -> None: ...

    params = {p.name: p for p in typer.main.get_command(app).params}
    assert (
        params["data"].required
        and params["data"].help == TrainConfig.model_fields["data"].description
    )
    assert params["resume"].default is True and params["resume"].secondary_opts == ["--no-resume"]
    assert params["max_train"].default is None and not params["max_train"].required


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (
            lambda: TrainConfig(data="d", out="o", epochs="two"),
            "--epochs 'two': input should be a valid number",
        ),
        (
            lambda: TrainConfig(data="d", out="o", bogus=1),
            "unknown setting 'bogus' for TrainConfig; use one of",
        ),
        (lambda: TrainConfig(out="o"), r"--data is required \(curated dataset directory"),
        (lambda: HarvestConfig(teacher="t", n="abc"), "--n 'abc': input should be a valid integer"),
        (
            lambda: HarvestConfig(teacher="t", temperature=3),
            "--temperature 3 must be between 0 and 2",
        ),
        (
            lambda: CurateConfig(dedup_on="words"),
            "--dedup-on 'words': use prompt, response or both",
        ),
        (lambda: SelfInstructConfig(novelty=0), "--novelty 0: use a ROUGE-L F1"),
        (lambda: EvalConfig(limit=0), "--limit 0"),
    ],
)
def test_bad_settings_raise_config_errors_naming_the_flag(build, message):
    with pytest.raises(ConfigError, match=message):
        build()


def test_configs_are_frozen_and_replace_validates():
    config = TrainConfig(data="d", out="o")
    with pytest.raises(ValueError, match="frozen"):
        config.epochs = 3
    assert config.replace(epochs=3).epochs == 3 and config.epochs == 2.0
    with pytest.raises(ConfigError, match="--lr 0"):
        config.replace(lr=0)
    assert HarvestConfig(teacher="t").replace(seed=7).seed == 7


def test_numbers_keep_the_type_they_were_given_so_fingerprints_are_unchanged():
    """These digests are the ones the dataclass configs gave (computed with the code before the
    move): a checkpoint of a run given ``epochs: 1`` resumes, and a harvest given ``temperature:
    1`` finds its stored answers, instead of both silently starting over."""
    examples = [{"input_ids": [1, 2, 3]}]
    common = dict(data="d", out="o", lr=1e-3, loss="gkd", max_train=5)
    ints = TrainConfig(**common, epochs=1, beta=0, lmbda=1)
    floats = TrainConfig(**common, epochs=1.0, beta=0.0, lmbda=1.0)
    assert type(ints.epochs) is int and type(floats.epochs) is float
    assert run_fingerprint(ints, examples) == (
        "397cbd3b1ef07f31ae42da3e047dab45a67492be1e7f42494bb49e1872340a68"
    )
    assert run_fingerprint(floats, examples) == (
        "ba12cefb458478c2f0c6b5d118cfe58be60b4b2a6df7d1f7565c6f63611bca0f"
    )
    prompt = Prompt("p1", (("user", "hi"),))
    assert fingerprint(
        HarvestConfig(teacher="t", temperature=1, seed=3, max_tokens=256).request(prompt)
    ) == ("d6d03233282a0453ea75fa8567d7b03ce570e50d7b5bd48ef4d4ace26493704a")
    assert fingerprint(
        HarvestConfig(teacher="t", temperature=1.0, seed=3, max_tokens=256).request(prompt)
    ) == ("c1776cf842e72f6eae31851e0a001062dd86b6f80111de9bd0e34bea627fbd68")
    # a string that reads as a number (a YAML `lr: 1e-3` is one) becomes the float
    assert TrainConfig(data="d", out="o", lr="1e-3").lr == 1e-3
