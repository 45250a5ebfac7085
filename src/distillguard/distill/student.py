"""Students made from the teacher, for ``distill train`` and ``distill eval``.

``prune:K[:influence|block|even][:mlpW]`` keeps K of the teacher's layers (the first and last
always) and cuts every MLP to its W most active neurons. The pruning itself lives in
:mod:`distillguard.models.prune` (every command that loads a model spec can build one); its
names are re-exported here for the scripts that imported them from ``distill``.
"""

from __future__ import annotations

from distillguard.errors import ConfigError
from distillguard.models import LoadedModel, load_model
from distillguard.models.prune import (
    PRUNE_METHODS,
    block_distance,
    block_influence,
    layer_subset,
    mlp_importance,
    only_layers,
    prune_layers,
    shrink_mlp,
)
from distillguard.models.spec import parse_prune_spec

__all__ = [
    "PRUNE_METHODS",
    "block_distance",
    "block_influence",
    "layer_subset",
    "load_student",
    "mlp_importance",
    "only_layers",
    "parse_prune_spec",
    "prune_layers",
    "require_same_tokenizer",
    "shrink_mlp",
]


def load_student(spec: str, teacher: str | LoadedModel) -> LoadedModel:
    """``spec`` as a student; ``prune:K[:how][:mlpW]`` copies K layers of ``teacher`` (a spec or a
    loaded model), chosen by ``how`` (``influence``, the default, ``block`` or ``even``), and with
    ``mlpW`` cuts every MLP to its W most active neurons (:func:`shrink_mlp`)."""
    return load_model(spec, device="cpu", teacher=teacher)


def require_same_tokenizer(teacher: LoadedModel, student: LoadedModel, loss: str) -> None:
    """Full-logit KD compares distributions id by id: the two vocabularies must be identical."""
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        differ = sorted(set(t_vocab.items()) ^ set(s_vocab.items()), key=lambda kv: kv[1])[:3]
        raise ConfigError(
            f"--loss {loss} needs the teacher's tokenizer, but teacher {teacher.spec} ({len(t_vocab)} tokens) and "
            f"student {student.spec} ({len(s_vocab)} tokens) differ (e.g. {differ}); use --loss sft, or a student "
            f"of the teacher's family (e.g. --student prune:K)"
        )
