"""Antidistillation sampling (Savani et al. 2025): answers that teach a student less.

The paper samples the teacher's next token from

    p(t | x)  ∝  exp( log p_teacher(t | x) / τ  +  λ · Δ(t | x) ),
    Δ(t | x)  =  ∇_θ log p_proxy(t | x; θ) · ∇_θ L(θ),

where θ are the parameters of a *proxy student* and ``L`` is the loss the provider wants a
distilled student to keep high (its "downstream" capability). Δ(t) is, to first order, how much
one gradient step on the token ``t`` would *raise* that loss: favouring tokens with a large Δ
makes every harvested answer a slightly worse training example. The paper estimates Δ with a
finite difference, i.e. two extra forward passes of the proxy per token.

On a CPU that doubles the cost of every step, so this module takes the proxy to be the part
of the teacher a distilled student actually inherits and trains first: the output embedding
``W`` (V x d). Students made from the teacher (``prune:K``, LoRA, distillation from logits) share
it, and for it Δ has a closed form (no finite difference, no second model):

    log p(t | x) = h·W_t - logsumexp(W h)   =>   Δ(t | x) = h·G_t - E_p[h·G],   G = ∇_W L,

with ``h`` the teacher's final hidden state. The expectation is the same for every ``t`` and so
cancels in the softmax: the whole perturbation is one (B x d)·(d x V) product per step, the
cost of the output layer once more. ``L`` is the mean next-token loss of the provider's chosen
answers (by default real ChatGPT answers from the bundled ShareGPT conversations), computed once
with autograd on ``W`` alone. ``G`` is scaled so that Δ has unit root-mean-square over those
answers' positions: λ is then in nats per unit of typical Δ.

Which answers pay: only the requests of accounts at a verdict level whose policy ladder includes
the ``antidistill`` action (``distillguard.guard.policy``). Its cost to a person's answers and its
effect on a student are measured in ``bench/antidistill.py``, not assumed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from distillguard.errors import ConfigError
from distillguard.models import LoadedModel

CHUNK = 512  # positions per slice of the gradient computation


@dataclass(frozen=True)
class AntidistillDirection:
    """``G`` (V x d): the downstream loss's gradient with respect to the output embedding, scaled."""

    gradient: torch.Tensor  # (V, d) float32
    loss: float  # the downstream loss L at the teacher's own W (mean nats per token)
    tokens: int  # positions it was computed on
    scale: float  # the factor applied so that Δ has unit spread under the teacher (see build_direction)

    def delta(self, hidden: torch.Tensor) -> torch.Tensor:
        """Δ up to a per-row constant (which the softmax ignores): (B, d) -> (B, V)."""
        return hidden.float() @ self.gradient.T


def _pairs_from_sharegpt(limit: int) -> list[tuple[str, str]]:
    from distillguard.data.sharegpt import first_turn_pairs

    # short prompts: the direction is about the answers, and long prompts only cost time
    return first_turn_pairs(limit, max_prompt_chars=600, min_answer_chars=41)


def downstream_pairs(source: str | None = None, limit: int = 64) -> list[tuple[str, str]]:
    """(prompt, answer) pairs whose loss a student should keep high: ``source`` is a JSONL file
    of ``{"prompt": ..., "answer": ...}`` (or ``response``) objects, or None for the first
    ``limit`` real ChatGPT answers of the bundled ShareGPT data."""
    if source is None or source == "sharegpt":
        return _pairs_from_sharegpt(limit)
    from pathlib import Path

    from distillguard.jsonl import iter_jsonl

    if not Path(source).is_file():
        raise ConfigError(f"cannot read antidistillation data {source}: no such file")
    pairs = []
    try:
        for n, obj in iter_jsonl(source):
            answer = obj.get("answer", obj.get("response"))
            if not isinstance(obj.get("prompt"), str) or not isinstance(answer, str):
                raise ConfigError(
                    f"{source}:{n}: expected a JSON object with string 'prompt' and 'answer'"
                )
            pairs.append((obj["prompt"], answer))
            if len(pairs) >= limit:
                break
    except OSError as exc:
        raise ConfigError(f"cannot read antidistillation data {source}: {exc}") from None
    if not pairs:
        raise ConfigError(f"{source}: no (prompt, answer) pairs")
    return pairs


def _hidden_and_targets(lm: LoadedModel, pairs: Iterable[tuple[str, str]], max_answer_tokens: int):
    """Final hidden states (N, d) at every answer position and the answer tokens (N,) they predict."""
    head = lm.model.get_output_embeddings()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0][0].detach()))
    hs, ys = [], []
    try:
        with torch.inference_mode():
            for prompt, answer in pairs:
                prompt_ids = lm.chat_ids([{"role": "user", "content": prompt}])
                answer_ids = lm.tokenizer.encode(answer, add_special_tokens=False)[
                    :max_answer_tokens
                ]
                if not answer_ids:
                    continue
                ids = prompt_ids + answer_ids
                captured.clear()
                lm.model(input_ids=torch.tensor([ids], device=lm.device))
                h = captured[-1]  # (T, d): the output layer's input at every position
                start = len(prompt_ids) - 1  # position predicting the first answer token
                hs.append(h[start : len(ids) - 1].float().cpu())
                ys.append(torch.tensor(answer_ids))
    finally:
        hook.remove()
    if not hs:
        raise ConfigError("antidistillation: no answer tokens to compute the direction from")
    return torch.cat(hs), torch.cat(ys)


def build_direction(
    lm: LoadedModel, pairs: Sequence[tuple[str, str]], *, max_answer_tokens: int = 128
) -> AntidistillDirection:
    """Compute ``G = ∇_W L`` for the teacher's output embedding ``W`` (autograd on ``W`` only)."""
    hidden, targets = _hidden_and_targets(lm, pairs, max_answer_tokens)
    weight, bias = _output_layer(lm)
    weight = weight.clone().requires_grad_(True)
    n = len(targets)
    chunks = list(zip(hidden.split(CHUNK), targets.split(CHUNK)))
    total = 0.0
    for h, y in chunks:  # in chunks: the logits of every position at once would take gigabytes
        loss = torch.nn.functional.cross_entropy(_logits(h, weight, bias), y, reduction="sum") / n
        loss.backward()  # accumulates the gradient of the mean loss into weight.grad
        total += float(loss.detach())
    gradient, scale = _unit_spread(hidden, weight.detach(), bias, weight.grad)
    return AntidistillDirection(gradient=gradient.to(lm.device), loss=total, tokens=n, scale=scale)


def _output_layer(lm: LoadedModel) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The output embedding ``W`` (V x d) and its bias, if any, as float32 on the CPU (detached)."""
    head = lm.model.get_output_embeddings()
    bias = getattr(head, "bias", None)
    return head.weight.detach().float().cpu(), (
        bias.detach().float().cpu() if bias is not None else None
    )


def _logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return h @ weight.T if bias is None else h @ weight.T + bias


def _unit_spread(hidden, weight, bias, grad) -> tuple[torch.Tensor, float]:
    """``grad`` scaled so that Δ = h·G has unit spread among the tokens the teacher would choose:
    its standard deviation under the teacher's distribution at each position, root-mean-squared
    over positions (over the whole vocabulary it would be dominated by tokens never sampled)."""
    var_sum = 0.0
    with torch.no_grad():
        for h in hidden.split(CHUNK):
            probs = torch.softmax(_logits(h, weight, bias), dim=-1)
            d = h @ grad.T
            var_sum += float(
                ((probs * d * d).sum(-1) - (probs * d).sum(-1).pow(2)).clamp(min=0).sum()
            )
    rms = (var_sum / len(hidden)) ** 0.5
    scale = 1.0 / rms if rms > 0 else 1.0
    return grad * scale, scale


def random_direction(
    lm: LoadedModel,
    pairs: Sequence[tuple[str, str]],
    *,
    seed: int = 0,
    max_answer_tokens: int = 128,
) -> AntidistillDirection:
    """A control: a random ``G`` with the same spread as :func:`build_direction`'s (a perturbation
    of the same size that is not aimed at any loss), for measuring what the aim adds."""
    hidden, targets = _hidden_and_targets(lm, pairs, max_answer_tokens)
    weight, bias = _output_layer(lm)
    g = torch.randn(weight.shape, generator=torch.Generator().manual_seed(seed))
    gradient, scale = _unit_spread(hidden, weight, bias, g)
    return AntidistillDirection(
        gradient=gradient.to(lm.device), loss=float("nan"), tokens=len(targets), scale=scale
    )


class HiddenTap:
    """Keeps the last position's input to the output layer (the final hidden state) of each
    forward pass: a forward hook, so the model's code and its caches are untouched."""

    def __init__(self, lm: LoadedModel):
        self.last: torch.Tensor | None = None
        self._handle = lm.model.get_output_embeddings().register_forward_hook(self._hook)

    def _hook(self, _module, args, _out) -> None:
        self.last = args[0][:, -1, :]

    def close(self) -> None:
        self._handle.remove()


def apply_antidistill(
    logits: torch.Tensor,
    hidden: torch.Tensor,
    direction: AntidistillDirection,
    lambdas: Sequence[float],
) -> torch.Tensor:
    """``logits + λ_b · Δ_b`` for the rows with λ_b > 0; other rows are returned unchanged."""
    lam = torch.tensor(lambdas, dtype=logits.dtype, device=logits.device)
    rows = torch.nonzero(lam > 0).flatten()
    if rows.numel() == 0:
        return logits
    out = logits.clone()
    out[rows] += (
        lam[rows, None] * direction.delta(hidden[rows]).to(logits.dtype)[:, : logits.shape[1]]
    )
    return out


__all__ = [
    "AntidistillDirection",
    "HiddenTap",
    "apply_antidistill",
    "build_direction",
    "downstream_pairs",
    "random_direction",
]
