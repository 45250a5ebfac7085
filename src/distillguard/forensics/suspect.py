"""Generating from the suspect: its weights in this process, or its OpenAI-compatible API."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import torch

from distillguard.errors import ConfigError
from distillguard.forensics.evidence import SuspectAPIError


def generate_answers(
    lm,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 64,
    temperature: float = 0.7,
    batch_size: int = 16,
    seed: int = 0,
    logits_processors: Sequence = (),
    after_temperature: Sequence = (),
    progress: bool = True,
) -> list[str]:
    """Answers of a local model to chat prompts: batched ``model.generate``, left-padded.

    ``logits_processors`` (e.g. a :class:`~distillguard.watermark.WatermarkLogitsProcessor`) act on the
    raw logits, before the temperature, as in the server; ``after_temperature`` ones (e.g.
    :class:`~distillguard.watermark.synthid.SynthIDTopK`, whose tournament acts on the distribution
    that is sampled) after it. Sorted by prompt length within the
    call so that batches waste little padding; returned in the prompts' order.
    """
    from transformers import LogitsProcessorList, TemperatureLogitsWarper

    from distillguard.progress import make_progress

    if temperature < 0:
        raise ConfigError(f"temperature={temperature} must be >= 0")
    tok_ids = [lm.chat_ids([{"role": "user", "content": p}]) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(tok_ids[i]))
    pad = (
        lm.tokenizer.pad_token_id
        if lm.tokenizer.pad_token_id is not None
        else min(lm.eos_token_ids)
    )
    eos = sorted(lm.eos_token_ids)
    processors = LogitsProcessorList(list(logits_processors))
    if temperature > 0:
        processors.append(TemperatureLogitsWarper(temperature))
    processors.extend(after_temperature)
    out: list[str] = [""] * len(prompts)
    gen = torch.Generator().manual_seed(seed)
    model = lm.model.eval()
    with make_progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("generating", total=len(prompts))
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(tok_ids[i]) for i in rows)
            ids = torch.tensor(
                [[pad] * (width - len(tok_ids[i])) + tok_ids[i] for i in rows], device=lm.device
            )
            mask = torch.tensor(
                [[0] * (width - len(tok_ids[i])) + [1] * len(tok_ids[i]) for i in rows],
                device=lm.device,
            )
            # generate() samples from the global RNG: seed it per batch, in a fork (the caller's state is kept)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
                seqs = model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=temperature > 0,
                    temperature=None,
                    top_k=None,
                    top_p=None,
                    logits_processor=processors,
                    pad_token_id=pad,
                    eos_token_id=eos,
                )
            for row, seq in zip(rows, seqs[:, width:].tolist()):
                cut = next((j for j, t in enumerate(seq) if t in lm.eos_token_ids), len(seq))
                out[row] = lm.tokenizer.decode(seq[:cut], skip_special_tokens=True)
            bar.advance(task, len(rows))
    return out


def generate_via_api(
    url: str,
    prompts: Sequence[str],
    *,
    model: str | None = None,
    api_key: str | None = None,
    max_tokens: int = 64,
    temperature: float = 0.7,
    seed: int = 0,
    concurrency: int = 8,
    timeout_s: float = 300.0,
) -> list[str]:
    """Answers of an OpenAI-compatible server (``url`` with or without ``/v1``), prompts sent in
    parallel (the server batches them). ``model`` defaults to the first of ``/v1/models``."""
    import httpx

    base = url.rstrip("/")
    base = base if base.endswith("/v1") else base + "/v1"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with httpx.Client(base_url=base, headers=headers, timeout=timeout_s) as client:
        try:
            if model is None:
                r = client.get("/models")
                r.raise_for_status()
                listed = r.json().get("data") or []
                if not listed:
                    raise SuspectAPIError(
                        f"{base}/models lists no model; pass the suspect's model name"
                    )
                model = listed[0]["id"]

            def ask(i: int) -> str:
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": prompts[i]}],
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "seed": seed + i,
                }
                resp = client.post("/chat/completions", json=body)
                if resp.status_code != 200:
                    raise SuspectAPIError(
                        f"the suspect answered {resp.status_code} to prompt {i}: {resp.text[:200]}"
                    )
                return resp.json()["choices"][0]["message"]["content"] or ""

            with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
                return list(pool.map(ask, range(len(prompts))))
        except httpx.HTTPError as exc:
            raise SuspectAPIError(f"cannot query the suspect at {base}: {exc}") from None
