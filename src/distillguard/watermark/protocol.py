"""The watermark :class:`Scheme` protocol and the registry of schemes.

A scheme is one object that the embedder (the server's sampler, ``model.generate``), the
detectors (text, teacher-weighted text) and the forensics (a suspect model's probabilities) all
ask; nothing else branches on a scheme's name. ``WatermarkParams.scheme`` names it and
``WatermarkParams.impl`` is the object.

Schemes are plugins of the entry-point group ``distillguard.watermark_schemes``; the built-ins
(``greenlist.py``: keyed-hash, lefthash-ref; ``synthid.py``: synthid) are entry points of
distillguard's own ``pyproject.toml``. Adding a scheme is one module with one class plus::

    [project.entry-points."distillguard.watermark_schemes"]
    myscheme = "my_package.my_scheme:MyScheme"

This module imports no scheme (they import it), so it sits below all of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, runtime_checkable

from distillguard.errors import ConfigError
from distillguard.plugins import Registry

if TYPE_CHECKING:
    import numpy as np
    import torch
    from transformers import LogitsProcessor

    from distillguard.watermark.detect import Detection
    from distillguard.watermark.entropy import PositionStats
    from distillguard.watermark.scheme import WatermarkKey, WatermarkParams

GROUP = "distillguard.watermark_schemes"


@runtime_checkable
class Scheme(Protocol):
    """What a watermark scheme provides. One instance serves every key of the scheme; the
    per-key and per-configuration state is in :class:`WatermarkParams` and :class:`WatermarkKey`."""

    name: ClassVar[str]
    # Where the server's sampler calls `embed`: on the raw logits (before temperature and
    # top-p), or on the log-probabilities each row samples from (after them).
    stage: ClassVar[Literal["logits", "logprobs"]]
    # What `watermark detect` reports as the detector used, without and with the teacher.
    detector_names: ClassVar[tuple[str, str]]
    # The name of the open-mode radioactivity test (forensics) over this scheme's evidence.
    suspect_test: ClassVar[str]

    def resolve(self, params: WatermarkParams) -> dict[str, Any]:
        """Values for the fields of ``params`` the user left unset (None), as this scheme fixes
        them by default; a ConfigError for a value the scheme cannot honour."""
        ...

    def embed(
        self, x: torch.Tensor, contexts: torch.Tensor, keys: Sequence[WatermarkKey | None]
    ) -> torch.Tensor:
        """Watermark the rows whose key is of this scheme; other rows come back bitwise as they
        were. x (B, V) logits or log-probabilities (``stage``); contexts (B, h) each row's last
        tokens, left-padded; keys one per row, None for no watermark."""
        ...

    def processor(self, key: WatermarkKey) -> LogitsProcessor:
        """The embedding as a transformers logits processor for ``model.generate``."""
        ...

    def detect(
        self,
        key: WatermarkKey,
        token_seqs: Sequence[Sequence[int]],
        prompt_seqs: Sequence[Sequence[int]],
        vocab_size: int,
        weights: Sequence[Sequence] | None,
        cache: dict | None = None,
    ) -> Detection:
        """Exact test of texts against one key (key-independent ``weights`` keep it exact).
        ``cache``: shared by the calls of one trace over many keys (key-independent work)."""
        ...

    def default_weights(
        self, params: WatermarkParams, answers: Sequence[Sequence[int]]
    ) -> list | None:
        """Key-independent weights for detection without the teacher (None: unweighted)."""
        ...

    def teacher_weights(
        self, params: WatermarkParams, stats: PositionStats, temperature: float, levels: int
    ) -> list:
        """Weights of one answer's tokens from the teacher's view of each position."""
        ...

    def suspect_scores(
        self,
        params: WatermarkParams,
        hash_keys: Sequence[int],
        contexts: torch.Tensor,
        top_ids: torch.Tensor,
        weights: torch.Tensor,
        vocab_size: int,
        units: bool,
    ) -> tuple[float, list[tuple[float, np.ndarray | None, torch.Tensor | None]]]:
        """Open-mode radioactivity: (the total weight, and per key the suspect's watermark mass
        on its top-k predictions ``Σ w·score`` with, when ``units``, the weights of the
        independent units under the null and the top-1 indicators at distinct units).
        contexts (N, h), top_ids and weights (N, k) (weights: the suspect's mean probabilities,
        independent of the key)."""
        ...


def _check(name: str, obj: object) -> Scheme:
    scheme = obj() if isinstance(obj, type) else obj
    if not isinstance(scheme, Scheme):
        raise ConfigError(
            f"watermark scheme {name!r} is {obj!r}, which lacks parts of the Scheme protocol "
            f"(distillguard.watermark.protocol.Scheme)"
        )
    if scheme.name != name:
        raise ConfigError(
            f"watermark scheme class {type(scheme).__qualname__} has name {scheme.name!r} but "
            f"is registered as {name!r}: make the two names equal"
        )
    return scheme


SCHEMES: Registry[Scheme] = Registry(GROUP, "watermark scheme", check=_check)


def get_scheme(name: str) -> Scheme:
    """The registered scheme ``name`` (a ConfigError naming the known ones if there is none)."""
    return SCHEMES.get(name)


def scheme_names() -> list[str]:
    return SCHEMES.names()


__all__ = ["GROUP", "SCHEMES", "Scheme", "get_scheme", "scheme_names"]
