"""The subprocess helper every real-server test, the demo and the benches start servers with."""

from __future__ import annotations

import json
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
        with serve_subprocess(
            "--model",
            "no-such-org/no-such-model",
            log_path=log,
            env={"HF_HUB_OFFLINE": "1"},
            timeout_s=120,
        ):
            pytest.fail("a server that cannot load its model must not be yielded")
    assert "no-such-org/no-such-model" in str(err.value) and str(log) in str(err.value)
    assert "no-such-org/no-such-model" in log.read_text()  # the log is kept for the user


def test_a_server_that_never_answers_is_stopped(tmp_path):
    pid_file, port = tmp_path / "pid", free_port()
    sleeper = [
        sys.executable,
        "-c",
        f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); "
        "print('starting', flush=True); time.sleep(120)",
    ]
    with pytest.raises(ServerStartError, match=r"did not answer /healthz within 2 s:\nstarting"):
        with process_until_healthy(sleeper, f"http://127.0.0.1:{port}", port=port, timeout_s=2):
            pytest.fail("not healthy, not yielded")
    assert gone(int(pid_file.read_text()))


def test_a_healthy_server_is_yielded_then_stopped():
    with serve_subprocess("--model", "tiny", "--no-guard") as server:
        assert httpx.get(f"{server.url}/healthz").status_code == 200
        assert server.url == f"http://127.0.0.1:{server.port}" and server.proc.poll() is None
    assert server.proc.returncode is not None


# ---- hostile connections (issue 24, item 11): header size, header and body read timeouts ----


@pytest.fixture(scope="module")
def strict_server():
    """A tiny server that gives a request head 1 s and a request body 1 s to arrive."""
    with serve_subprocess(
        "--model", "tiny", "--no-guard", "--header-timeout", "1", "--body-timeout", "1"
    ) as server:
        yield server


def exchange(server, *parts: bytes, pause_s: float = 0.0, wait_s: float = 30.0) -> bytes:
    """Send ``parts`` on one raw connection (``pause_s`` apart), then read until the server closes
    it; what it answered (b"" when it closed or reset without a word). A server that keeps the
    connection open past ``wait_s`` fails the test."""
    import socket
    import time

    with socket.create_connection(("127.0.0.1", server.port), timeout=wait_s) as s:
        try:
            for part in parts:
                s.sendall(part)
                time.sleep(pause_s)
        except (BrokenPipeError, ConnectionResetError):  # closed on us mid-way: read what it said
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        except TimeoutError:
            pytest.fail(
                f"the server still held the connection after {wait_s} s (answered {got[:80]!r})"
            )
        return got


def test_an_oversized_header_is_refused_and_others_are_still_served(strict_server):
    head = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    # The client is still sending when the server refuses (the head goes on past the limit):
    # the server reads and drops the rest; closing at once reset the connection now and then,
    # and the refusal was lost.
    answer = exchange(strict_server, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert error_body(answer)["code"] == "request_header_too_large"
    assert httpx.get(f"{strict_server.url}/healthz").status_code == 200


def test_a_head_sent_a_byte_at_a_time_is_cut_off(strict_server):
    slow = [bytes([b]) for b in b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200]
    answer = exchange(
        strict_server, *slow, pause_s=0.05
    )  # 11 s at this pace; the server allows 1 s
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    silent = exchange(strict_server)  # a connection that sends nothing at all
    assert silent == b"" or error_body(silent)["code"] == "request_timeout", silent
    assert httpx.get(f"{strict_server.url}/healthz").status_code == 200


def test_a_body_that_never_arrives_is_cut_off(strict_server):
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    answer = exchange(strict_server, head, b'{"model": "tiny", ')
    assert b" 200 " not in answer.split(b"\r\n", 1)[0]
    assert httpx.get(f"{strict_server.url}/healthz").status_code == 200


def test_each_request_on_a_kept_alive_connection_has_its_own_head_deadline(strict_server):
    first, second = (
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /healthz HTTP/1.1\r\nHost: x\r\n",
    )
    answer = exchange(strict_server, first, second, pause_s=0.2)  # the second head never ends
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.count(b"HTTP/1.1 ") == 2, answer
    last = answer[answer.rindex(b"HTTP/1.1 ") :]
    assert last.startswith(b"HTTP/1.1 408 Request Timeout\r\n") and b"connection: close\r\n" in last
    assert error_body(last)["code"] == "request_timeout"


def error_body(response: bytes) -> dict:
    """The OpenAI-shaped error of a raw HTTP response the server wrote itself (serve/server.py)."""
    head, _, body = response.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower(), head
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    return error
