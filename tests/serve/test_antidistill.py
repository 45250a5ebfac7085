"""Antidistillation sampling: the direction is the downstream loss's gradient, the engine applies
it to exactly the rows that ask for it, and a gateway applies it to suspects only."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from distillguard.errors import ConfigError
from distillguard.serve.antidistill import apply_antidistill, build_direction, downstream_pairs
from distillguard.serve.engine import Engine, GenParams, Job
from tests.guard.test_policy import ledger_rows
from tests.serve.test_engine import Sink
from tests.servers import serve_process

PAIRS = [
    ("What is the capital of France?", "The capital of France is Paris, a city on the Seine."),
    ("Name three primary colours.", "Red, yellow and blue are the traditional primary colours."),
    ("How do plants make food?", "Plants make food by photosynthesis, using light, water and CO2."),
]


@pytest.fixture(scope="module")
def direction(tiny_lm):
    return build_direction(tiny_lm, PAIRS)


def hidden_and_logits(lm, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden state and logits of every position, read independently of the module."""
    with torch.inference_mode():
        out = lm.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return out.hidden_states[-1][0].float(), out.logits[0].float()


def test_direction_is_the_gradient_of_the_downstream_loss(tiny_lm, direction):
    # closed form of ∇_W mean CE(h W^T, y) = (softmax - onehot)^T H / N, computed by hand here
    hs, ys = [], []
    for prompt, answer in PAIRS:
        p_ids = tiny_lm.chat_ids([{"role": "user", "content": prompt}])
        a_ids = tiny_lm.tokenizer.encode(answer, add_special_tokens=False)
        h, _ = hidden_and_logits(tiny_lm, p_ids + a_ids)
        hs.append(h[len(p_ids) - 1 : len(p_ids) + len(a_ids) - 1])
        ys.append(torch.tensor(a_ids))
    h, y = torch.cat(hs), torch.cat(ys)
    w = tiny_lm.model.get_output_embeddings().weight.detach().float()
    probs = torch.softmax(h @ w.T, dim=-1)
    probs[torch.arange(len(y)), y] -= 1
    expected = probs.T @ h / len(y)
    assert direction.tokens == len(y)
    torch.testing.assert_close(direction.gradient / direction.scale, expected, rtol=1e-4, atol=1e-6)
    # scaled so that Δ's standard deviation under the teacher is 1 in RMS over those positions
    d = h @ direction.gradient.T
    p = torch.softmax(h @ w.T, dim=-1)
    var = (p * d * d).sum(-1) - (p * d).sum(-1) ** 2
    assert float(var.mean().sqrt()) == pytest.approx(1.0, rel=1e-3)


def test_delta_is_the_directional_derivative_of_the_token_logprob(tiny_lm, direction):
    ids = tiny_lm.chat_ids([{"role": "user", "content": "Tell me about rivers."}])
    h, _ = hidden_and_logits(tiny_lm, ids)
    h = h[-1:]
    w = tiny_lm.model.get_output_embeddings().weight.detach().float()
    eps = 1e-3
    fd = (
        torch.log_softmax(h @ (w + eps * direction.gradient).T, -1)
        - torch.log_softmax(h @ (w - eps * direction.gradient).T, -1)
    ) / (2 * eps)
    delta = direction.delta(h)
    # equal up to the per-row constant E_p[h·G], which the softmax ignores
    torch.testing.assert_close(delta - delta.mean(), fd - fd.mean(), rtol=1e-2, atol=1e-3)


def test_rows_get_antidistillation_only_when_they_ask(tiny_lm, direction):
    prompt = tiny_lm.chat_ids([{"role": "user", "content": "Where do rivers go?"}])
    h, logits = hidden_and_logits(tiny_lm, prompt)
    plain = torch.log_softmax(logits[-1], -1)
    lam = 3.0
    perturbed = torch.log_softmax(logits[-1] + lam * direction.delta(h[-1:])[0], -1)
    assert (perturbed.topk(5).indices != plain.topk(5).indices).any() or not torch.allclose(
        perturbed.topk(5).values, plain.topk(5).values, atol=1e-3
    )

    engine = Engine(tiny_lm, max_batch_rows=4, batch_wait_s=0.05)
    engine.enable_antidistill(direction)
    engine.start()
    try:
        sinks = {name: Sink(name) for name in ("plain", "anti")}
        for name, value in (("plain", 0.0), ("anti", lam)):  # one batch, two rows
            params = GenParams(
                max_new_tokens=1, temperature=1.0, seed=1, top_logprobs=5, antidistill=value
            )
            engine.submit(Job(prompt_ids=prompt, params=params, n=1, sink=sinks[name]))
        for sink in sinks.values():
            sink.wait()
    finally:
        engine.stop()
    for name, expected in (("plain", plain), ("anti", perturbed)):
        entry = next(e for e in sinks[name].events if e.kind == "delta" and e.logprobs).logprobs[0]
        got = [t["logprob"] for t in entry["top_logprobs"]]
        torch.testing.assert_close(torch.tensor(got), expected.topk(5).values, rtol=1e-4, atol=1e-4)


def test_apply_leaves_rows_with_zero_lambda_bitwise_alone(direction):
    logits = torch.randn(3, direction.gradient.shape[0])
    hidden = torch.randn(3, direction.gradient.shape[1])
    out = apply_antidistill(logits, hidden, direction, [0.0, 2.0, 0.0])
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])


def test_downstream_data_errors_are_clear(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    with pytest.raises(ConfigError, match="bad.jsonl:1"):
        downstream_pairs(str(bad))
    with pytest.raises(ConfigError, match="cannot read"):
        downstream_pairs(str(tmp_path / "missing.jsonl"))
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PAIRS))
    assert downstream_pairs(str(good), limit=2) == PAIRS[:2]


def test_gateway_serves_suspects_antidistilled_answers(tmp_path):
    data = tmp_path / "downstream.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PAIRS))
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        json.dumps({"ladder": {"suspect": ["log", "antidistill"]}, "antidistill_lambda": 6})
    )
    db = f"sqlite:///{tmp_path / 'ledger.db'}"
    admin_key = "adm-" + "x" * 20
    env = {
        "DISTILLGUARD_ADMIN_KEY": admin_key,
        "DISTILLGUARD_WATERMARK_SECRET": "s" * 32,
        "DISTILLGUARD_VERDICT_CACHE_TTL_S": "0",
    }
    with serve_process(
        "--model",
        "tiny",
        "--db",
        db,
        "--policy",
        str(policy),
        "--no-watermark",
        "--antidistill-data",
        str(data),
        env=env,
    ) as url:

        def admin(method, path, **kw):
            return httpx.request(
                method,
                url + path,
                headers={"Authorization": f"Bearer {admin_key}"},
                timeout=30,
                **kw,
            )

        keys = {
            a: admin("POST", "/admin/keys", json={"account": a}).json()["key"]
            for a in ("olga", "sam")
        }
        assert (
            admin("POST", "/admin/accounts/sam/verdict", json={"level": "suspect"}).status_code
            == 201
        )

        def ask(account):
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "Tell me a story."}],
                "max_tokens": 24,
                "seed": 11,
                "temperature": 1.0,
                "logprobs": True,
                "top_logprobs": 3,
            }
            resp = httpx.post(
                f"{url}/v1/chat/completions",
                json=body,
                timeout=60,
                headers={"Authorization": f"Bearer {keys[account]}"},
            )
            assert resp.status_code == 200, resp.text
            return resp.json()["choices"][0]

        olga, sam = ask("olga"), ask("sam")
        first = [c["logprobs"]["content"][0]["top_logprobs"] for c in (olga, sam)]
        assert first[0] != first[1]  # the suspect's distribution is not the teacher's
        assert (
            ask("olga") == olga
        )  # an account in good standing gets the teacher's answer, reproducibly
        assert [r.policy_action for r in ledger_rows(db, "sam")] == ["suspect:log,antidistill"]
        assert [r.policy_action for r in ledger_rows(db, "olga")] == [None, None]


def test_random_control_has_the_same_spread_but_no_aim(tiny_lm, direction):
    from distillguard.serve.antidistill import random_direction

    control = random_direction(tiny_lm, PAIRS, seed=3)
    assert control.gradient.shape == direction.gradient.shape and control.tokens == direction.tokens
    h, _ = hidden_and_logits(tiny_lm, tiny_lm.chat_ids([{"role": "user", "content": PAIRS[0][0]}]))
    w = tiny_lm.model.get_output_embeddings().weight.detach().float()
    cos = torch.nn.functional.cosine_similarity(
        control.gradient.flatten(), direction.gradient.flatten(), dim=0
    )
    assert abs(float(cos)) < 0.2  # unrelated to the downstream gradient
    for g in (control.gradient, direction.gradient):  # both have spread of order one here too
        d = h @ g.T
        p = torch.softmax(h @ w.T, dim=-1)
        spread = float(((p * d * d).sum(-1) - (p * d).sum(-1) ** 2).mean().sqrt())
        assert 0.1 < spread < 10
