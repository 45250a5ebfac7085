"""Backends as plugins: the built-ins come from distillguard's own entry points, and a backend
shipped as one new module plus one entry point (a real installed distribution) is served by
``distillguard serve --backend NAME``, behind the whole guard pipeline."""

from __future__ import annotations

import os
import sys

import openai
import pytest
from sqlalchemy import select

from distillguard.errors import ConfigError
from distillguard.guard.db import make_engine, migrate
from distillguard.guard.keys import KeyStore
from distillguard.guard.schema import LedgerRow
from distillguard.serve.backend import BACKENDS, Capability, capabilities_of
from distillguard.serve.local import LocalBackend
from distillguard.serve.upstream import UpstreamBackend
from tests.plugin_dist import install_plugin
from tests.servers import run_cli, serve_process

# A complete third-party backend: it echoes the last message back, reversed.
ECHO_BACKEND = """
import time
import uuid


class EchoBackend:
    capabilities = frozenset()  # no countermeasure: the pipeline asks it for none

    def __init__(self, config):
        self.config = config

    @classmethod
    def from_config(cls, config):
        return cls(config)

    def describe(self):
        return "echoing every message back, reversed"

    async def start(self):
        pass

    async def close(self):
        pass

    async def model_ids(self):
        return ["echo"]

    async def budget(self, req):
        return self.prompt_tokens(req) + 64

    def prompt_tokens(self, req):
        return sum(len(str(m.content).split()) for m in req.messages)

    def count_tokens(self, text):
        return len(text.split())

    def _answer(self, req):
        return req.messages[-1].content[::-1]

    async def complete(self, req, *, watermark=None, usage=None, **_):
        text = self._answer(req)
        counts = {"prompt_tokens": self.prompt_tokens(req), "completion_tokens": self.count_tokens(text)}
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": req.model,
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text},
                 "logprobs": None, "finish_reason": "stop"}
            ],
            "usage": {**counts, "total_tokens": sum(counts.values())},
        }

    async def stream(self, req, *, watermark=None, usage=None, **_):
        raise NotImplementedError
"""


def test_the_built_in_backends_are_entry_points():
    assert BACKENDS.get("local") is LocalBackend
    assert BACKENDS.get("upstream") is UpstreamBackend
    with pytest.raises(ConfigError, match=r"unknown backend 'nope'; known: .*local, upstream"):
        BACKENDS.get("nope")


def test_serve_names_the_known_backends_for_an_unknown_one():
    done = run_cli("serve", "--backend", "nope", "--no-guard", "--port", "0")
    assert done.returncode == 2
    assert "unknown backend 'nope'" in done.stderr and "local, upstream" in done.stderr


def test_the_upstream_backend_without_a_url_says_what_to_add():
    done = run_cli("serve", "--backend", "upstream", "--no-guard", "--port", "0")
    assert done.returncode == 2
    assert "add --upstream URL" in done.stderr


def test_capabilities_are_one_query_with_the_old_flags_read_for_one_release():
    class Declared:
        capabilities = frozenset({"watermark"})  # names are accepted as well as members

    class OldFlags:
        supports_watermark = True
        supports_antidistill = False

    class Unknown:
        capabilities = frozenset({"watermark", "teleport"})

    assert capabilities_of(Declared()) == {Capability.WATERMARK}
    assert capabilities_of(OldFlags()) == {Capability.WATERMARK}  # silent on each request
    with pytest.warns(DeprecationWarning, match="OldFlags declares supports_antidistill"):
        capabilities_of(OldFlags(), warn=True)
    assert capabilities_of(object()) == frozenset()
    with pytest.raises(ConfigError, match="'teleport'.*known: watermark, antidistill"):
        capabilities_of(Unknown())


def test_a_plugin_backend_is_served_behind_the_guard(monkeypatch, tmp_path):
    install_plugin(
        monkeypatch,
        tmp_path / "plugin",
        "echo-backend",
        {"echo_backend": ECHO_BACKEND},
        {"distillguard.backends": {"echo": "echo_backend:EchoBackend"}},
    )
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = make_engine(db)
    migrate(engine)
    _, secret = KeyStore(engine).create("acct")
    engine.dispose()
    # the server is another process: it finds the plugin the way an installed one is found
    path = os.pathsep.join([str(tmp_path / "plugin"), *sys.path])
    with serve_process("--backend", "echo", "--db", db, env={"PYTHONPATH": path}) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=secret, max_retries=0)
        answer = client.chat.completions.create(
            model="echo", messages=[{"role": "user", "content": "pipeline"}]
        )
        assert answer.choices[0].message.content == "enilepip"
        assert [m.id for m in client.models.list().data] == ["echo"]
        with pytest.raises(openai.AuthenticationError):  # the guard's stages run before it
            client.with_options(api_key="wrong").chat.completions.create(
                model="echo", messages=[{"role": "user", "content": "x"}]
            )
    with make_engine(db).connect() as conn:
        rows = conn.execute(select(LedgerRow.account_id, LedgerRow.response_text)).all()
    assert [tuple(r) for r in rows] == [("acct", "enilepip")]  # and its ledger row is written
