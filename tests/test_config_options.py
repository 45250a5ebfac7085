"""One config style: the serve, guard, detect and traffic configs are pydantic models whose fields
carry their help, and the CLI builds its options from them (``cli/options.option``), as the
distill configs are (tests/distill/test_config.py): a default or a help text written again in
the CLI, and differing, fails here. Calibration files written by the dataclass DetectConfig stay
readable."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import typer
import typer.main

from distillguard.arena.traffic import CampaignSpec, TrafficConfig
from distillguard.cli import app
from distillguard.cli.options import option
from distillguard.detect.config import DetectConfig
from distillguard.errors import ConfigError
from distillguard.guard.config import GuardConfig
from distillguard.guard.policy import PolicyConfig
from distillguard.serve.config import ServeConfig
from tests.distill.test_config import drift

DATA = Path(__file__).parent / "data"

# command -> (its configs, CLI parameter -> field where the names differ (None: not compared,
# the CLI spells the value differently), the parameters that are no config's setting)
COMMANDS = {
    ("serve",): (
        (ServeConfig, GuardConfig),
        {
            "backend_name": "backend",
            "upstream_timeout": "upstream_timeout_s",
            "header_timeout": "header_timeout_s",
            "body_timeout": "body_timeout_s",
            "keep_alive_timeout": "keep_alive_timeout_s",
            "policy": "policy_file",
            "detect": "detect_calibration",
            "detect_lease_ttl": "detect_lease_ttl_s",
            "detect_poll": "detect_poll_s",
            "forwarded_allow_ips": None,  # comma-separated text, a tuple in the config
        },
        {"no_guard", "forwarded_allow_ips"},
    ),
    ("detect",): (
        (DetectConfig,),
        {"detectors": None},  # comma-separated text, a tuple in the config
        # what to read and write, and how to show it: not detection settings
        {
            "traffic",
            "ledger",
            "calibrate_file",
            "calibration",
            "save_calibration",
            "as_json",
            "plot",
            "top",
            "detectors",
        },
    ),
    ("arena", "traffic"): (
        (TrafficConfig,),
        {"campaign": None},  # KIND[:ACCOUNTS[:REQUESTS]] text, parsed into CampaignSpecs
        {"campaign", "output", "plot", "list_kinds"},
    ),
}


def command(path: tuple[str, ...]):
    found = typer.main.get_command(app)
    for name in path:
        found = found.commands[name]
    return found


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=" ".join)
def test_cli_defaults_and_help_are_the_configs(path):
    models, aliases, cli_only = COMMANDS[path]
    cmd = command(path)
    compared = []
    for model in models:
        result = drift(cmd, model, aliases, set())
        # a list of option names means no drift
        assert all(not c.startswith("--") for c in result), result
        compared += result
    # every option is some config's setting, or one of the few the CLI alone has
    assert sorted(compared) == sorted(p.name for p in cmd.params if p.name not in cli_only)
    assert len(compared) >= {"serve": 35, "detect": 1, "arena": 16}[path[0]]


def test_the_check_fails_on_a_restated_default_or_help():
    """The comparison above, on a command that writes a serve, a guard and a detect setting out
    again the way the serve command used to (its --port, --no-watermark and --target-fpr)."""
    restated = typer.Typer()

    @restated.command()
    def cmd(
        port: int = typer.Option(8001, help="TCP port (0 picks a free one)"),
        host: str = option(ServeConfig, "host"),
        watermark: bool = typer.Option(True, help="watermark responses"),
        target_fpr: float = typer.Option(0.01, help="false-positive rate"),
    ) -> None: ...

    click_cmd = typer.main.get_command(restated)
    assert drift(click_cmd, ServeConfig, {}, set()) == ["--port: default 8001, config 8000"]
    assert drift(click_cmd, GuardConfig, {}, set()) == [
        "--watermark: help 'watermark responses', config "
        f"{GuardConfig.model_fields['watermark'].description!r}"
    ]
    assert drift(click_cmd, DetectConfig, {}, set())[0] == (
        "--target_fpr: default 0.01, config 0.001"
    )


def test_serve_options_read_the_environment_variables_they_always_read():
    envvars = {p.name: p.envvar for p in command(("serve",)).params if p.envvar}
    assert envvars == {
        "upstream_api_key": "DISTILLGUARD_UPSTREAM_API_KEY",
        "max_prompt_tokens": "DISTILLGUARD_MAX_PROMPT_TOKENS",
        "prefill_chunk": "DISTILLGUARD_PREFILL_CHUNK",
        "db": "DISTILLGUARD_DB",
        "redis": "DISTILLGUARD_REDIS",
        "watermark_scheme": "DISTILLGUARD_WATERMARK_SCHEME",
        "watermark_gamma": "DISTILLGUARD_WATERMARK_GAMMA",
        "watermark_delta": "DISTILLGUARD_WATERMARK_DELTA",
        "policy": "DISTILLGUARD_POLICY_FILE",
        "detect": "DISTILLGUARD_DETECT_CALIBRATION",
        "forwarded_allow_ips": "DISTILLGUARD_FORWARDED_ALLOW_IPS",
        "metrics_auth": "DISTILLGUARD_METRICS_AUTH",
        "ledger_content": "DISTILLGUARD_LEDGER_CONTENT",
    }


def test_the_guards_watermark_defaults_are_the_schemes():
    """GuardConfig writes WatermarkParams' γ and δ out (importing it would load torch into every
    CLI start); they must not part."""
    from distillguard.watermark import WatermarkParams

    fields = GuardConfig.model_fields
    assert fields["watermark_gamma"].default == WatermarkParams.gamma
    assert fields["watermark_delta"].default == WatermarkParams.delta


@pytest.mark.parametrize(
    "model", [ServeConfig, GuardConfig, PolicyConfig, TrafficConfig, CampaignSpec, DetectConfig]
)
def test_every_setting_has_help_and_the_config_is_frozen(model):
    assert model.model_config["frozen"] is True
    assert not [n for n, f in model.model_fields.items() if not f.description]


# ---- DetectConfig, from a dataclass to a pydantic model ----------------------------------


@pytest.mark.parametrize(
    ("settings", "message"),
    # the messages of the dataclass's __post_init__, unchanged
    [
        ({"target_fpr": 0}, r"^target FPR 0 must lie in \(0, 1\), e.g. 0.001 for 0.1%$"),
        ({"target_fpr": 1.5}, r"^target FPR 1.5 must lie in \(0, 1\)"),
        ({"stride": 0}, r"^detect option stride=0 must be a positive integer$"),
        ({"embed_every_flagged": -1}, r"^detect option embed_every_flagged=-1 must be a positive"),
        ({"tail_extrapolation": 0.5}, r"^tail_extrapolation=0.5 must be >= 1 \(1 = no extrap"),
        ({"embed_after": 65}, r"^embed_after \(65\) cannot exceed window \(64\)$"),
        ({"window": 8}, r"^embed_after \(16\) cannot exceed window \(8\)$"),
        ({"min_prompts": 40, "window": 32}, r"^min_prompts \(40\) cannot exceed window \(32\)$"),
        # what the dataclass let through and failed on later
        ({"window": "wide"}, r"^detect option window='wide': Input should be a valid integer"),
        ({"windows": 32}, r"^unknown detect option 'windows'; use one of target_fpr, "),
    ],
)
def test_detect_config_refuses_what_the_dataclass_refused_with_its_messages(settings, message):
    with pytest.raises(ConfigError, match=message):
        DetectConfig(**settings)


def test_detect_config_is_frozen_replace_validates_and_it_pickles():
    config = DetectConfig(target_fpr=0.01, detectors=["volume", "shape"])
    # a list, as a JSON file gives, becomes the tuple
    assert config.detectors == ("volume", "shape")
    with pytest.raises(ValueError, match="frozen"):
        config.window = 32
    assert config.replace(window=32, min_prompts=8).window == 32 and config.window == 64
    with pytest.raises(ConfigError, match=r"cannot exceed window \(8\)"):
        config.replace(window=8)  # model_copy(update=...) would have let it through
    assert pickle.loads(pickle.dumps(config)) == config
    assert config != config.replace(stride=8)


def test_a_calibration_written_by_the_dataclass_config_still_loads():
    """tests/data/calibration_dataclass_config.npz was saved by the code before DetectConfig was a
    pydantic model (calibrate() on 40 synthetic benign accounts, tests/detect/synth.py)."""
    from distillguard.detect import Calibration

    cal = Calibration.load(DATA / "calibration_dataclass_config.npz")
    assert cal.config == DetectConfig(
        target_fpr=0.05,
        detectors=("volume", "timing", "shape"),
        window=32,
        tail_extrapolation=100.0,
        extra={"volume": {"k": 1}},
    )
    assert round(cal.threshold, 6) == 12.591587
    assert type(cal.config.tail_extrapolation) is float and type(cal.config.window) is int


def test_a_calibration_file_stores_the_config_as_the_dataclass_did():
    # json.dumps(DetectConfig().to_dict()) of the dataclass, word for word
    before = (
        '{"target_fpr": 0.001, "detectors": [], "window": 64, "stride": 16, "min_prompts": 16, '
        '"reference_size": 256, "topics": 32, "history": 256, "link_min_evidence": 3, '
        '"embed_every": 8, "embed_after": 16, "embed_every_flagged": 32, '
        '"embed_followups": false, "tail_extrapolation": 10000.0, "extra": {}}'
    )
    assert json.dumps(DetectConfig().to_dict()) == before
    assert DetectConfig.from_dict(json.loads(before)) == DetectConfig()
    with pytest.raises(ConfigError, match=r"unknown detect option\(s\) \['bogus'\] in calib"):
        DetectConfig.from_dict({**json.loads(before), "bogus": 1})
