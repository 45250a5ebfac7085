"""The subprocess helper every real-server test, the demo and the benches start servers with."""

from __future__ import annotations

import os
import sys

import httpx
import pytest

from distillguard.errors import ServerStartError
from distillguard.serve.process import free_port, process_until_healthy, serve_subprocess


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_server_that_exits_is_an_error_quoting_its_log(tmp_path):
    log = tmp_path / "serve.log"
    with pytest.raises(ServerStartError, match="exited with 2") as err:
        with serve_subprocess("--model", "no-such-org/no-such-model", log_path=log,
                              env={"HF_HUB_OFFLINE": "1"}, timeout_s=120):
            pytest.fail("a server that cannot load its model must not be yielded")
    assert "no-such-org/no-such-model" in str(err.value) and str(log) in str(err.value)
    assert "no-such-org/no-such-model" in log.read_text()  # the log is kept for the user


def test_a_server_that_never_answers_is_stopped(tmp_path):
    pid_file, port = tmp_path / "pid", free_port()
    sleeper = [sys.executable, "-c", f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
               "print('starting', flush=True); time.sleep(120)"]
    with pytest.raises(ServerStartError, match=r"did not answer /healthz within 2 s:\nstarting"):
        with process_until_healthy(sleeper, f"http://127.0.0.1:{port}", port=port, timeout_s=2):
            pytest.fail("not healthy, not yielded")
    assert gone(int(pid_file.read_text()))


def test_a_healthy_server_is_yielded_then_stopped():
    with serve_subprocess("--model", "tiny", "--no-guard") as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert server.url == f"http://127.0.0.1:{server.port}" and server.proc.poll() is None
    assert server.proc.returncode is not None
