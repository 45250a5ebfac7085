"""What ``--upstream-engine vllm`` sends upstream for a watermarked request, without a server:
the account's key material in ``vllm_xargs``, the request's sampler handed to the plugin and a
neutral one to vLLM; a plain upstream gets none of it; a client's ``vllm_xargs`` is refused."""

from __future__ import annotations

import json

import pytest

from distillguard.errors import InvalidRequestError
from distillguard.serve.backend import Capability
from distillguard.serve.config import ServeConfig
from distillguard.serve.keymaterial import XARG, Sampler, decode
from distillguard.serve.schemas import parse_chat_request
from distillguard.serve.upstream import UpstreamBackend
from distillguard.watermark import WatermarkParams, account_key

SECRET = b"the-master-secret"
KEY = account_key(SECRET, "acct-a", WatermarkParams(scheme="synthid"))


def _req(**kw):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **kw}
    return parse_chat_request(json.dumps(body).encode())


def _backend(engine: str) -> UpstreamBackend:
    return UpstreamBackend(ServeConfig(upstream="http://127.0.0.1:9", upstream_engine=engine))


def test_vllm_engine_sends_the_account_key_and_a_neutral_sampler():
    backend = _backend("vllm")
    assert backend.capabilities == {Capability.WATERMARK}
    body = backend._body(
        _req(temperature=0.7, top_p=0.9, presence_penalty=0.5, frequency_penalty=-0.25), KEY
    )
    assert (body["temperature"], body["top_p"]) == (1.0, 1.0)
    assert "presence_penalty" not in body and "frequency_penalty" not in body
    raw = body["vllm_xargs"][XARG]
    assert SECRET.decode() not in raw
    key, sampler = decode(raw)
    assert (key.hash_key, key.key_id, key.params) == (KEY.hash_key, KEY.key_id, KEY.params)
    assert sampler == Sampler(0.7, 0.9, 0.5, -0.25)
    # greedy stays greedy on vLLM's side (the plugin's distribution is argmaxed)
    assert _backend("vllm")._body(_req(temperature=0), KEY)["temperature"] == 0.0
    # an unset temperature is the schema's default (1.0), sent explicitly to the plugin
    assert decode(_backend("vllm")._body(_req(), KEY)["vllm_xargs"][XARG])[1] == Sampler()


def test_unkeyed_and_plain_upstream_requests_are_sent_as_they_came():
    req = _req(temperature=0.7, top_p=0.9)
    assert _backend("vllm")._body(req, None) == _backend("openai")._body(req, None)
    plain = _backend("openai")
    assert plain.capabilities == frozenset()
    assert "vllm_xargs" not in plain._body(req, KEY) and plain._body(req, KEY)["temperature"] == 0.7


@pytest.mark.parametrize("field", ["vllm_xargs", "repetition_penalty", "top_k", "min_p"])
def test_a_client_cannot_send_vllm_fields(field):
    with pytest.raises(InvalidRequestError) as err:
        _req(**{field: {"distillguard": "{}"} if field == "vllm_xargs" else 1})
    assert err.value.code == "unknown_parameter"


def test_serve_refuses_an_unknown_upstream_engine():
    with pytest.raises(ValueError, match="upstream_engine"):
        ServeConfig(upstream="http://x", upstream_engine="tgi")
