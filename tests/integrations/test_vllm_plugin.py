"""The plugin inside vLLM's own virtualenv: it imports without the gateway's dependencies, and
vLLM's real processor class, BatchUpdate and SamplingParams give our engine's rows bit for bit
(the scenario of tests/integrations/scenario.py)."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from tests.integrations.conftest import REPO, vllm_env

pytestmark = [pytest.mark.slow, pytest.mark.timeout(2400)]

IMPORT_CHECK = textwrap.dedent(
    """
    import json, sys
    import vllm.v1.sample.logits_processor
    before = set(sys.modules)
    from distillguard.integrations.vllm import WatermarkLogitsProcessor
    from distillguard.serve.keymaterial import XARG, Sampler, encode
    from distillguard.watermark import WatermarkParams, account_key
    from vllm import SamplingParams
    new = sorted(set(sys.modules) - before)
    key = account_key(b"s", "acct-a", WatermarkParams())
    refused = []
    for kw in (dict(temperature=0.7), dict(temperature=1.0, top_p=0.9),
               dict(temperature=1.0, presence_penalty=0.5), dict(temperature=0.0)):
        try:
            WatermarkLogitsProcessor.validate_params(
                SamplingParams(extra_args={XARG: encode(key, Sampler(0.7))}, **kw))
        except ValueError as exc:
            refused.append(str(exc)[:80])
    WatermarkLogitsProcessor.validate_params(
        SamplingParams(temperature=1.0, extra_args={XARG: encode(key, Sampler(0.7))}))
    WatermarkLogitsProcessor.validate_params(SamplingParams(temperature=0.3))
    print(json.dumps({"new": new, "refused": refused}))
    """
)

# what the gateway needs and vLLM's environment must not be made to import by the plugin
GATEWAY_ONLY = {
    "fastapi", "pydantic_settings", "sqlalchemy", "alembic", "typer", "rich", "uvicorn",
    "psycopg", "redis", "prometheus_client", "datasets", "sentence_transformers", "peft",
}  # fmt: skip
ALLOWED_OURS = ("distillguard.watermark", "distillguard.integrations")
ALLOWED_OURS_EXACT = {
    "distillguard",
    "distillguard.errors",
    "distillguard.plugins",
    "distillguard.serve",
    "distillguard.serve.sampling",
    "distillguard.serve.keymaterial",
}


def _run(python, *args, timeout=900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(python), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=vllm_env(),
        timeout=timeout,
    )


def test_plugin_imports_in_vllms_env_without_the_gateway(vllm_python):
    proc = _run(vllm_python, "-c", IMPORT_CHECK)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    roots = {m.split(".")[0] for m in result["new"]}
    assert not roots & GATEWAY_ONLY, roots & GATEWAY_ONLY
    ours = [m for m in result["new"] if m.split(".")[0] == "distillguard"]
    assert "distillguard.integrations.vllm" in ours
    stray = [m for m in ours if m not in ALLOWED_OURS_EXACT and not m.startswith(ALLOWED_OURS)]
    assert stray == []
    # a keyed request whose vLLM sampler is not neutral is refused (it would apply twice)
    assert len(result["refused"]) == 4, result["refused"]


def test_vllm_processor_equals_the_engine_bit_for_bit(vllm_python):
    proc = _run(vllm_python, "-m", "tests.integrations.scenario", "--vllm")
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["steps"] == 13 and result["keyed_rows"] == 54 and result["plain_rows"] == 4
    assert result["changed"] == ["kh", "synthid", "synthid-greedy"]
    assert result["resumed_rows"] == 3  # preempted with output so far, resumed in another slot
