"""Training examples: prompt + answer token ids with labels on the answer only (SFT), the
teacher's top-k logprobs per answer position (top-k KD), and the padded batches of both."""

from __future__ import annotations

import json
from collections import Counter

import torch

from distillguard.errors import ConfigError
from distillguard.models import LoadedModel

IGNORE = -100  # label of a position no loss is taken at (the Hugging Face convention)


def sft_example(
    lm: LoadedModel,
    messages: list[dict],
    response: str,
    max_length: int,
    *,
    capped: bool = False,
    stats: Counter | None = None,
) -> dict | None:
    """input_ids of prompt + answer in the chat template, labels only on the answer (and its end).

    ``capped``: the answer was cut at the harvest's max_tokens (``finish_reason: length``), so it
    did not end there, and its end-of-turn is left out: a student taught to stop where the cap
    fell would stop mid-sentence.

    Longer than ``max_length``: the answer is cut (what remains is still the teacher's answer to
    the prompt shown), or, when the prompt alone fills ``max_length``, the example is dropped
    (None): cutting the prompt instead would teach an answer to a question the student cannot
    see. ``stats`` counts both ("truncated", "dropped_long")."""
    prompt = lm.chat_ids(messages)
    full = lm.tokenizer.apply_chat_template(
        messages + [{"role": "assistant", "content": response}], tokenize=True
    )
    full = list(full["input_ids"] if hasattr(full, "keys") else full)
    if full[: len(prompt)] != prompt:
        raise ConfigError(
            "the student's chat template renders the prompt differently with and without the "
            "answer; cannot mask the prompt reliably"
        )
    # Train on the answer and the end-of-turn token, not on what the template appends after it.
    end = len(full)
    while end > len(prompt) and full[end - 1] not in lm.eos_token_ids:
        end -= 1
    end = end if end > len(prompt) else len(full)
    if capped and end > len(prompt) and full[end - 1] in lm.eos_token_ids:
        end -= 1
    ids = full[:end][:max_length]
    if len(ids) <= len(prompt):
        _count(stats, "dropped_long")  # no answer token fits
        return None
    if end > max_length:
        _count(stats, "truncated")
    labels = [IGNORE] * len(prompt) + ids[len(prompt) :]
    return {"input_ids": ids, "labels": labels[: len(ids)], "prompt_len": len(prompt)}


def _count(stats: Counter | None, what: str) -> None:
    if stats is not None:
        stats[what] += 1


def topk_examples(
    lm: LoadedModel, rows: list[dict], max_length: int, stats: Counter | None = None
) -> list[dict | None]:
    """Top-k KD examples of harvested rows, one per row (None for a row without logprobs or too
    long, counted in ``stats`` as "no_logprobs" or as :func:`sft_example` counts); ConfigError
    when they carry no top-k logprobs or tokens the student's vocabulary does not have."""
    byte_to_id = _byte_index(lm)
    k = max(
        (len(e.get("top_logprobs", [])) for r in rows for e in json.loads(r["logprobs"] or "[]")),
        default=0,
    )
    if k == 0:
        raise ConfigError("--loss topk-kd needs harvested logprobs: harvest with --top-logprobs K")
    examples = []
    for r in rows:
        if not r["logprobs"]:
            _count(stats, "no_logprobs")
            examples.append(None)
            continue
        entries = json.loads(r["logprobs"])
        examples.append(kd_example(lm, byte_to_id, r["messages"], entries, max_length, k, stats))
    return examples


def kd_example(
    lm: LoadedModel,
    byte_to_id: dict[bytes, int],
    messages: list[dict],
    entries: list[dict],
    max_length: int,
    k: int,
    stats: Counter | None = None,
) -> dict | None:
    """Teacher's own token sequence with its top-k distribution at every answer position (cut
    or dropped at ``max_length`` as in :func:`sft_example`)."""
    prompt = lm.chat_ids(messages)
    answer, top_ids, top_lps = [], [], []
    for entry in entries:
        tok = byte_to_id.get(bytes(entry["bytes"]))
        alts = [
            (byte_to_id.get(bytes(a["bytes"])), a["logprob"]) for a in entry.get("top_logprobs", [])
        ]
        if tok is None or any(t is None for t, _ in alts):
            raise ConfigError(
                "the harvested logprobs use tokens the student's vocabulary does not have: top-k KD needs a "
                "student with the teacher's tokenizer (use --loss sft, or a student from the same family)"
            )
        answer.append(tok)
        alts = alts[:k] + [(0, float("-inf"))] * (k - len(alts[:k]))
        top_ids.append([t for t, _ in alts])
        top_lps.append([max(lp, -1e4) if lp != float("-inf") else float("-inf") for _, lp in alts])
    eos = sorted(lm.eos_token_ids)[0]
    ids = (prompt + answer + [eos])[:max_length]
    n_answer = (
        len(ids) - len(prompt) - 1
    )  # positions predicting answer tokens (the eos step has no top-k)
    if n_answer < 1:
        _count(stats, "dropped_long")
        return None
    if len(prompt) + len(answer) + 1 > max_length:
        _count(stats, "truncated")
    # Position t predicts token t+1: answer token j is predicted at position len(prompt)-1+j.
    return {
        "input_ids": ids,
        "labels": [IGNORE] * len(prompt) + ids[len(prompt) :],
        "kd_start": len(prompt) - 1,
        "topk_ids": top_ids[:n_answer],
        "topk_logprobs": top_lps[:n_answer],
    }


def collate(batch: list[dict], pad_id: int, *, prompts: bool = False) -> dict:
    """Right-padded ids, mask and labels; with ``prompts`` also the left-padded prompts alone
    (``prompt_ids``, ``prompt_mask``) for on-policy generation."""
    width = max(len(b["input_ids"]) for b in batch)
    out = {
        "input_ids": torch.tensor(
            [b["input_ids"] + [pad_id] * (width - len(b["input_ids"])) for b in batch]
        ),
        "attention_mask": torch.tensor(
            [[1] * len(b["input_ids"]) + [0] * (width - len(b["input_ids"])) for b in batch]
        ),
        "labels": torch.tensor(
            [b["labels"] + [IGNORE] * (width - len(b["labels"])) for b in batch]
        ),
    }
    if prompts:
        heads = [b["input_ids"][: b["prompt_len"]] for b in batch]
        p = max(map(len, heads))
        out["prompt_ids"] = torch.tensor([[pad_id] * (p - len(h)) + h for h in heads])
        out["prompt_mask"] = torch.tensor([[0] * (p - len(h)) + [1] * len(h) for h in heads])
    if "topk_ids" in batch[0]:
        k = len(batch[0]["topk_ids"][0])
        ids = torch.zeros((len(batch), width, k), dtype=torch.long)
        lps = torch.full((len(batch), width, k), float("-inf"))
        mask = torch.zeros((len(batch), width), dtype=torch.bool)
        for b, ex in enumerate(batch):
            s, n = ex["kd_start"], len(ex["topk_ids"])
            ids[b, s : s + n] = torch.tensor(ex["topk_ids"])
            lps[b, s : s + n] = torch.tensor(ex["topk_logprobs"])
            mask[b, s : s + n] = True
        out.update(topk_ids=ids, topk_logprobs=lps, kd_mask=mask)
    return out


def _byte_index(lm: LoadedModel) -> dict[bytes, int]:
    """Token bytes -> id. Ordinary tokens first; special tokens (e.g. ``<|im_end|>``, which the API
    lists among the top-k alternatives near the end of an answer) only where no ordinary token
    has their bytes."""
    index: dict[bytes, int] = {}
    special = set(lm.tokenizer.all_special_ids)
    for i, b in enumerate(lm.token_bytes):
        if b and i not in special:
            index.setdefault(b, i)
    for i in sorted(special):
        if i < len(lm.token_bytes) and lm.token_bytes[i]:
            index.setdefault(lm.token_bytes[i], i)
    return index
