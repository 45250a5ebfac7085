"""Students made from a teacher: Block Influence layer pruning and Minitron MLP-width pruning.

``prune:K[:influence|block|even][:mlpW]`` (:mod:`distillguard.models.spec`) keeps K of the
teacher's layers (the first and last always) and cuts every MLP to its W most active neurons: a
smaller initialisation that keeps the teacher's knowledge, chosen on real text (the bundled
ShareGPT turns) without a teacher query. Here, in ``models``, so that every command that loads a
model spec can build one (``forensics --suspect prune:15`` as the untrained control, ``serve``).
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from distillguard.errors import ConfigError
from distillguard.models.lm import LoadedModel
from distillguard.models.spec import PRUNE_METHODS


@contextlib.contextmanager
def only_layers(lm: LoadedModel, idx: list[int]):
    """``lm`` with only the decoder layers ``idx`` for the duration, the teacher's own swapped back
    after (no copy: fine for forward passes without a KV cache, which is what indexes layers)."""
    layers = lm.model.model.layers
    lm.model.model.layers = torch.nn.ModuleList([layers[i] for i in idx])
    try:
        yield lm
    finally:
        lm.model.model.layers = layers


def layer_subset(lm: LoadedModel, idx: list[int]) -> torch.nn.Module:
    """A deep copy of ``lm.model`` with only the decoder layers ``idx`` (only those are copied)."""
    with only_layers(lm, idx):
        model = copy.deepcopy(lm.model)
    for new, layer in enumerate(model.model.layers):  # the KV cache is indexed by layer_idx
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new
    model.config.num_hidden_layers = len(idx)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in idx]
    return model


def _hidden_states(lm: LoadedModel, pairs: list[tuple[str, str]] | None, max_answer_tokens: int):
    """Every decoder layer's input and output (``n + 1`` states) on real conversations: the
    bundled ShareGPT first turns by default, so choosing a student's layers spends no teacher query."""
    if pairs is None:
        from distillguard.data.sharegpt import first_turn_pairs

        pairs = first_turn_pairs(24)
    for prompt, answer in pairs:
        prompt_ids = lm.chat_ids([{"role": "user", "content": prompt}])
        answer_ids = lm.tokenizer(answer, add_special_tokens=False)["input_ids"][:max_answer_tokens]
        ids = torch.tensor([(prompt_ids + answer_ids)[-lm.context_length :]], device=lm.device)
        yield lm.model(ids, output_hidden_states=True, use_cache=False).hidden_states


@torch.inference_mode()
def block_influence(
    lm: LoadedModel, pairs: list[tuple[str, str]] | None = None, max_answer_tokens: int = 96
) -> torch.Tensor:
    """Block Influence of every decoder layer (ShortGPT, Men et al. 2024): 1 - cos(h_in, h_out)
    averaged over the tokens of real conversations. A layer that barely turns the residual stream
    can go.

    Hand-written: a forward pass with ``output_hidden_states`` and a cosine; no pruning library
    in our dependencies computes it for a Hugging Face decoder.
    """
    n = len(lm.model.model.layers)
    total, count = torch.zeros(n, dtype=torch.float64), 0
    for hidden in _hidden_states(lm, pairs, max_answer_tokens):
        for i in range(n):  # every position, the chat template's included, as ShortGPT does
            cos = torch.nn.functional.cosine_similarity(
                hidden[i][0].float(), hidden[i + 1][0].float(), dim=-1
            )
            total[i] += float((1 - cos).mean())
        count += 1
    return total / max(count, 1)


@torch.inference_mode()
def block_distance(
    lm: LoadedModel,
    drop: int,
    pairs: list[tuple[str, str]] | None = None,
    max_answer_tokens: int = 96,
) -> torch.Tensor:
    """For every start ``l``, the angular distance arccos(cos(h_l, h_{l+drop})) / pi between the
    residual stream before layer ``l`` and after layer ``l + drop - 1``, at the last token,
    averaged over real conversations (Gromov et al. 2024, "The Unreasonable Ineffectiveness of
    the Deeper Layers"). The contiguous block with the smallest distance changes the stream least:
    the layers after it still get the input they were trained on. Entry ``l`` is for dropping
    layers ``l .. l + drop - 1``; hand-written for the reason :func:`block_influence` is.
    """
    n = len(lm.model.model.layers)
    total, count = torch.zeros(n - drop + 1, dtype=torch.float64), 0
    for hidden in _hidden_states(lm, pairs, max_answer_tokens):
        for start in range(n - drop + 1):
            cos = torch.nn.functional.cosine_similarity(
                hidden[start][0, -1].float(), hidden[start + drop][0, -1].float(), dim=0
            )
            total[start] += math.acos(float(cos.clamp(-1, 1))) / math.pi
        count += 1
    return total / max(count, 1)


def prune_layers(
    lm: LoadedModel, keep: int, how: str = "influence", pairs: list[tuple[str, str]] | None = None
) -> LoadedModel:
    """A student made of ``keep`` decoder layers of ``lm`` (first and last always kept).

    ``influence`` (default): the layers with the largest Block Influence on real text
    (:func:`block_influence`). Measured on SmolLM2-135M-Instruct (``bench/distill_curves.py``,
    README): untrained, 15 of its 30 layers chosen this way give 5.2 nats/token on held-out
    teacher answers where 15 evenly spaced layers give 12.8 (8 layers: 9.7 vs 16.9): the middle
    layers turn the residual stream least. ``block``: drop the contiguous block of ``n - keep``
    layers with the smallest angular distance (:func:`block_distance`): untrained ``prune:11``
    7.73 nats where ``influence`` gives 10.62, but after top-k KD on 1,000 teacher answers 2.52
    against 2.49 (``docs/decisions/prune-layer-choice.md``), so the lead does not
    last and ``influence`` stays the default. ``even``: evenly spaced layers.
    """
    layers = lm.model.model.layers
    n = len(layers)
    if not 1 <= keep <= n:
        raise ConfigError(f"prune:{keep}: the teacher has {n} layers; keep between 1 and {n}")
    if how not in PRUNE_METHODS:
        raise ConfigError(
            f"prune:{keep}:{how}: unknown layer choice; use one of {', '.join(PRUNE_METHODS)}"
        )
    if keep == 1:
        idx = [0]
    elif how == "even" or keep == n:
        idx = sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})
    elif how == "block":
        drop = n - keep
        distance = block_distance(lm, drop, pairs)
        start = min(range(1, n - drop), key=lambda s: float(distance[s]))
        idx = [i for i in range(n) if not start <= i < start + drop]
    else:
        influence = block_influence(lm, pairs)
        middle = sorted(range(1, n - 1), key=lambda i: -float(influence[i]))[: keep - 2]
        idx = sorted([0, n - 1, *middle])
    return LoadedModel(
        spec=f"{lm.spec}:prune{len(idx)}",
        model=layer_subset(lm, idx),
        tokenizer=lm.tokenizer,
        device=lm.device,
        context_length=lm.context_length,
        eos_token_ids=lm.eos_token_ids,
    )


@torch.inference_mode()
def mlp_importance(
    lm: LoadedModel, pairs: list[tuple[str, str]] | None = None, max_answer_tokens: int = 96
) -> list[torch.Tensor]:
    """Per decoder layer, the mean magnitude of each MLP neuron's activation (the input of
    ``down_proj``) over the tokens of real conversations: the activation-based width importance
    of Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge
    Distillation"), no gradient and no teacher query. Hand-written: a forward hook and a mean;
    no library in our dependencies prunes a Hugging Face decoder's MLP width."""
    layers = lm.model.model.layers
    sums: list[torch.Tensor | None] = [None] * len(layers)
    tokens = 0

    def hook(i: int):
        def record(module, args) -> None:
            magnitude = args[0].detach().float().abs().sum(dim=(0, 1))
            sums[i] = magnitude if sums[i] is None else sums[i] + magnitude

        return record

    if not all(hasattr(getattr(layer, "mlp", None), "down_proj") for layer in layers):
        raise ConfigError(
            f"{lm.spec}: MLP width pruning needs gated MLPs with gate/up/down projections (Llama family)"
        )
    handles = [
        layer.mlp.down_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(layers)
    ]
    try:
        for hidden in _hidden_states(lm, pairs, max_answer_tokens):
            tokens += hidden[0].shape[1]
    finally:
        for handle in handles:
            handle.remove()
    return [s / max(tokens, 1) for s in sums]


def shrink_mlp(
    lm: LoadedModel, width: int, pairs: list[tuple[str, str]] | None = None
) -> LoadedModel:
    """``lm`` (changed in place) with every MLP cut to its ``width`` most important neurons
    (:func:`mlp_importance`): rows of ``gate_proj`` and ``up_proj``, columns of ``down_proj``.
    Width pruning keeps every layer's attention and so the depth; Minitron found it recovers
    better than dropping layers at the same size once retrained."""
    config = lm.model.config
    full = getattr(config, "intermediate_size", None)
    if not full or not 1 <= width <= full:
        raise ConfigError(
            f"mlp{width}: the MLP has {full} neurons per layer; keep between 1 and {full}"
        )
    if width == full:
        return lm
    importance = mlp_importance(lm, pairs)

    def cut(old: torch.nn.Linear, idx: torch.Tensor, dim: int) -> torch.nn.Linear:
        weight = old.weight.detach().index_select(dim, idx).clone()
        new = torch.nn.Linear(
            weight.shape[1],
            weight.shape[0],
            bias=old.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        new.weight = torch.nn.Parameter(weight)
        if old.bias is not None:
            new.bias = torch.nn.Parameter(
                (old.bias.detach()[idx] if dim == 0 else old.bias.detach()).clone()
            )
        return new

    for layer, scores in zip(lm.model.model.layers, importance):
        keep = torch.topk(scores, width).indices.sort().values.to(layer.mlp.down_proj.weight.device)
        layer.mlp.gate_proj = cut(layer.mlp.gate_proj, keep, 0)
        layer.mlp.up_proj = cut(layer.mlp.up_proj, keep, 0)
        layer.mlp.down_proj = cut(layer.mlp.down_proj, keep, 1)
        if hasattr(layer.mlp, "intermediate_size"):
            layer.mlp.intermediate_size = width
    config.intermediate_size = width  # save_pretrained / from_pretrained rebuild the same shapes
    lm.spec = f"{lm.spec}:mlp{width}"
    return lm


def build_pruned(teacher: LoadedModel, keep: int, how: str, width: int | None) -> LoadedModel:
    """The student ``prune:keep:how[:mlp<width>]`` of a loaded ``teacher`` (left untouched)."""
    student = prune_layers(teacher, keep, how)
    return shrink_mlp(student, width) if width is not None else student


__all__ = [
    "PRUNE_METHODS",
    "block_distance",
    "block_influence",
    "build_pruned",
    "layer_subset",
    "mlp_importance",
    "only_layers",
    "prune_layers",
    "shrink_mlp",
]
