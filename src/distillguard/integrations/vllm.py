"""distillguard's per-account watermarks inside vLLM: a vLLM v1 logits processor.

Load it into vLLM with one flag (vLLM's own environment, with distillguard installed there
``--no-deps``: ``scripts/vllm_env.sh``; the V1 model runner, whose interface this is)::

    VLLM_USE_V2_MODEL_RUNNER=0 python -m vllm.entrypoints.openai.api_server --model DIR \\
        --logits-processors distillguard.integrations.vllm:WatermarkLogitsProcessor \\
        --logprobs-mode processed_logprobs

and put the gateway in front (``distillguard serve --upstream URL --upstream-engine vllm``): it
sends each request's account key in ``vllm_xargs`` (``serve/keymaterial.py``). Requests without it are
not touched. ``--logprobs-mode processed_logprobs`` makes the logprobs vLLM returns those of
the distribution actually sampled from, the rule our engine follows.

Antidistillation is not offered here: it needs the final hidden state of each row (the
direction is applied to the teacher's last hidden state, serve/antidistill.py), and vLLM's
logits-processor hook receives only the logits (``apply(logits)``) and per-request parameters
and token ids, never the hidden states.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor

from distillguard.errors import ConfigError
from distillguard.integrations.rows import WatermarkRows, material
from distillguard.serve.keymaterial import XARG, decode

_EPS = 1e-5  # vLLM's _SAMPLING_EPS: a temperature below it is greedy


class WatermarkLogitsProcessor(LogitsProcessor):
    """Each keyed row's next-token distribution as our engine computes it (penalties, green-list
    bias, temperature, top-p, SynthID tournament), from the row's key material in
    ``SamplingParams.extra_args["distillguard"]``; vLLM then samples it with a neutral sampler."""

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        raw = material(sampling_params)
        if raw is None:
            return
        try:
            _, sampler = decode(raw)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        sp = sampling_params
        greedy = sp.temperature < _EPS
        neutral = (
            (greedy or sp.temperature == 1.0)
            and greedy == (sampler.temperature == 0)
            and sp.top_p == 1.0
            and sp.top_k in (0, -1, None)
            and sp.min_p == 0.0
            and sp.presence_penalty == 0.0
            and sp.frequency_penalty == 0.0
            and sp.repetition_penalty == 1.0
        )
        if not neutral:
            raise ValueError(
                f"vllm_xargs[{XARG!r}] carries the request's sampler, which the distillguard "
                f"plugin applies itself: send vLLM temperature 1 (0 when the material's "
                f"temperature is 0), top_p 1, no top_k/min_p and no penalties (got "
                f"temperature={sp.temperature}, top_p={sp.top_p}, top_k={sp.top_k}, "
                f"min_p={sp.min_p}, presence_penalty={sp.presence_penalty}, "
                f"frequency_penalty={sp.frequency_penalty}, "
                f"repetition_penalty={sp.repetition_penalty})"
            )

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows = WatermarkRows()

    def is_argmax_invariant(self) -> bool:
        return False  # the green-list bias changes greedy answers too, as in our engine

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is not None:
            self.rows.update(batch_update.removed, batch_update.added, batch_update.moved)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return self.rows.apply(logits)


__all__ = ["WatermarkLogitsProcessor"]
