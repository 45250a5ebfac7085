"""Every model spec a user has works as the suspect of ``forensics radioactivity`` (open mode)
and ``forensics canaries``: tiny, a prune:K student cut from the teacher (the untrained control
of the investigator's journey), a directory; a spec that cannot load fails in one line naming
the accepted forms. Tiny models, two prompts, a few tokens: the command is what is tested."""

from __future__ import annotations

import json

import pytest

from distillguard.models import load_model
from tests.servers import run_cli

ONE_THREAD = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def radioactivity(suspect: str, tmp_path, *extra: str):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tell me about cats\nexplain the rain\n")
    return run_cli(
        "forensics",
        "radioactivity",
        "--suspect",
        suspect,
        "--secret",
        "spec-test-secret",
        "--accounts",
        "acme,bystander",
        "--prompts",
        str(prompts),
        "--tokenizer",
        "tiny",
        "--scheme",
        "keyed-hash",
        "--max-tokens",
        "6",
        "--null-keys",
        "0",
        "--device",
        "cpu",
        *extra,
        env=ONE_THREAD,
        timeout=300,
    )


@pytest.fixture(scope="module")
def saved_dir(tmp_path_factory):
    lm = load_model("tiny:seed=2", device="cpu")
    path = tmp_path_factory.mktemp("suspect")
    lm.model.save_pretrained(path)
    lm.tokenizer.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize(
    "suspect",
    ["tiny:seed=1", "prune:1", "prune:1:even:mlp64@tiny", "DIR"],
    ids=["tiny", "prune-from-teacher", "prune-own-teacher", "directory"],
)
def test_each_spec_form_is_a_suspect(suspect, saved_dir, tmp_path):
    out = radioactivity(saved_dir if suspect == "DIR" else suspect, tmp_path, "--json")
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["mode"] == "open" and result["texts"] == 2
    assert sorted(k["account"] for k in result["keys"]) == ["acme", "bystander"]
    # an untrained or random suspect traces to nobody, and says what the test could have seen
    assert result["traced"] == []
    power = result["power"]
    assert power["test"] == "chernoff" and power["level"] == pytest.approx(1e-3 / 2)
    assert power["units"] > 0 and power["per_query"] == pytest.approx(power["units"] / 2)
    assert all("power" in k["extra"] for k in result["keys"])


def test_the_text_output_states_the_power(tmp_path):
    out = radioactivity("prune:1", tmp_path)
    assert out.returncode == 0, out.stderr
    said = " ".join(out.stdout.split())  # rich may wrap lines when not on a terminal
    assert "traced to: no account" in said and "not traced:" in said
    assert "with 80% power" in said and "prompts near the suspect's training" in said


@pytest.mark.parametrize(
    "suspect,fragment",
    [
        ("no-such-org/no-such-model", "prune:K"),  # offline: the Hub fails, the forms are listed
        ("prune:x", "prune:K"),
        ("/nonexistent/model.gguf", "no such GGUF file"),
    ],
)
def test_a_bad_spec_is_one_line_naming_the_forms(suspect, fragment, tmp_path):
    out = radioactivity(suspect, tmp_path)
    assert out.returncode == 2, out.stderr
    assert fragment in out.stderr and suspect in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_the_issue_command_with_the_bundled_teacher(tmp_path):
    """Issue 28's command: the untrained student of `distill train --student prune:15:mlp896`,
    cut from the bundled teacher, as the control of `forensics radioactivity`."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("tell me about cats\nexplain the rain\n")
    out = run_cli(
        "forensics",
        "radioactivity",
        "--suspect",
        "prune:15:mlp896",
        "--secret",
        "spec-test-secret",
        "--accounts",
        "acme-labs,bystander",
        "--prompts",
        str(prompts),
        "--max-tokens",
        "8",
        "--null-keys",
        "0",
        "--device",
        "cpu",
        "--json",
        env=ONE_THREAD,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["traced"] == [] and result["power"]["test"] == "chernoff"
