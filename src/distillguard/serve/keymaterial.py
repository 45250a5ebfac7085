"""The per-request key material the gateway puts in a vLLM request's ``vllm_xargs`` and the vLLM
plugin reads back from ``SamplingParams.extra_args``.

It is one account's derived key (``scheme.account_key``: HMAC of the account id under the master
secret), never the master secret, with the scheme's resolved parameters and the request's own
sampler settings. Why the sampler settings: the plugin runs our engine's sampler math for a
watermarked row (penalties, then the green-list bias, temperature and top-p, then SynthID's
tournament on the distribution sampled from), so that the distribution is the engine's bit for
bit; vLLM is then asked for a neutral sampler on that row (temperature 1, or 0 for greedy, top-p
1, no penalties), which leaves the plugin's log-probabilities as they are. The plugin refuses a
keyed request whose vLLM sampler is not neutral (it would be applied twice).

The material travels as one JSON string under the ``distillguard`` key (``vllm_xargs`` values
are flat strings and numbers).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache

from distillguard.errors import ConfigError
from distillguard.watermark.scheme import SynthIDParams, WatermarkKey, WatermarkParams

XARG = "distillguard"  # the vllm_xargs / extra_args key
VERSION = 1


@dataclass(frozen=True)
class Sampler:
    """The request's own sampler settings, applied by the plugin (not by vLLM) on keyed rows."""

    temperature: float = 1.0
    top_p: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


def encode(key: WatermarkKey, sampler: Sampler) -> str:
    """The ``vllm_xargs`` value for one request watermarked with ``key``."""
    p = key.params
    return json.dumps(
        {
            "v": VERSION,
            "key_id": key.key_id,
            "hash_key": key.hash_key,
            "scheme": p.scheme,
            "gamma": p.gamma,
            "delta": p.delta,
            "context_width": p.context_width,
            "candidates": p.candidates,
            "min_entropy": p.min_entropy,
            "synthid": {
                "depth": p.synthid.depth,
                "ngram_len": p.synthid.ngram_len,
                "top_k": p.synthid.top_k,
                "table_size": p.synthid.table_size,
            },
            "temperature": sampler.temperature,
            "top_p": sampler.top_p,
            "presence_penalty": sampler.presence_penalty,
            "frequency_penalty": sampler.frequency_penalty,
        },
        separators=(",", ":"),
    )


@lru_cache(maxsize=4096)
def decode(raw: object) -> tuple[WatermarkKey, Sampler]:
    """(key, sampler) from a ``vllm_xargs`` value; a ConfigError naming what is wrong. Cached: a
    request's material is decoded once when it is validated and again when it joins the batch,
    and an account's requests repeat it."""
    if not isinstance(raw, str):
        raise ConfigError(
            f"extra_args[{XARG!r}] must be the JSON string the distillguard gateway sends, "
            f"got {type(raw).__name__}"
        )
    try:
        m = json.loads(raw)
    except ValueError as exc:
        raise ConfigError(f"extra_args[{XARG!r}] is not valid JSON: {exc}") from None
    if not isinstance(m, dict) or m.get("v") != VERSION:
        raise ConfigError(
            f"extra_args[{XARG!r}] is not version {VERSION} key material (gateway and plugin "
            f"must come from the same distillguard release)"
        )
    try:
        hash_key = m["hash_key"]
        if not isinstance(hash_key, int) or isinstance(hash_key, bool) or not 0 < hash_key < 2**63:
            raise ConfigError(f"hash_key={hash_key!r} must be a positive 63-bit integer")
        synthid = m["synthid"]
        params = WatermarkParams(
            scheme=m["scheme"],
            gamma=m["gamma"],
            delta=float(m["delta"]),
            context_width=m["context_width"],
            candidates=m["candidates"],
            min_entropy=m["min_entropy"],
            synthid=SynthIDParams(**synthid) if isinstance(synthid, dict) else synthid,
        )
        sampler = Sampler(
            temperature=float(m["temperature"]),
            top_p=float(m["top_p"]),
            presence_penalty=float(m["presence_penalty"]),
            frequency_penalty=float(m["frequency_penalty"]),
        )
        key = WatermarkKey(params=params, hash_key=hash_key, key_id=str(m["key_id"]))
    except KeyError as exc:
        raise ConfigError(f"extra_args[{XARG!r}] lacks {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"extra_args[{XARG!r}] has a bad value: {exc}") from None
    s = sampler
    if not (
        math.isfinite(s.temperature)
        and 0 <= s.temperature <= 2
        and 0 <= s.top_p <= 1
        and -2 <= s.presence_penalty <= 2
        and -2 <= s.frequency_penalty <= 2
    ):
        raise ConfigError(
            f"extra_args[{XARG!r}] sampler {s} is out of range (temperature 0-2, top_p 0-1, "
            f"penalties -2..2)"
        )
    return key, sampler


__all__ = ["VERSION", "XARG", "Sampler", "decode", "encode"]
