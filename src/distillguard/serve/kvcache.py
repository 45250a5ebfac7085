"""The engine's KV-cache helpers: a cache layer that grows in place, the chat template's shared
prefix (whose cache is computed once and reused by every prompt), and cheap cache copies."""

from __future__ import annotations

import copy

import torch

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # older transformers: no layered caches, no prefix reuse
    DynamicLayer = None

from distillguard.models import LoadedModel

_RoomyLayer = None  # defined below where transformers has layered caches

if DynamicLayer is not None:

    class _RoomyLayer(DynamicLayer):
        """A :class:`DynamicLayer` that appends each step's keys and values into spare room at the
        end of a larger buffer, instead of copying the whole cache into a new tensor at every step
        (a few per cent of a decoding step at 16 rows, growing with the context). ``keys`` and
        ``values`` are views of the buffer; when anything else replaces them (merging rows into
        the batch, pruning), the next update moves them into a new buffer.
        """

        ROOM = 32  # spare positions per buffer

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            if not self.is_initialized:
                return super().update(key_states, value_states, *args, **kwargs)
            t, n = self.keys.shape[-2], key_states.shape[-2]
            ours = (
                self.keys is getattr(self, "_keys_view", None) and self.values is self._values_view
            )
            if not ours or t + n > self._key_buf.shape[-2]:
                self._key_buf = self._move(self.keys, t + n + self.ROOM)
                self._value_buf = self._move(self.values, t + n + self.ROOM)
            self._key_buf[:, :, t : t + n] = key_states
            self._value_buf[:, :, t : t + n] = value_states
            self.keys = self._keys_view = self._key_buf[:, :, : t + n]
            self.values = self._values_view = self._value_buf[:, :, : t + n]
            return self.keys, self.values

        @staticmethod
        def _move(x: torch.Tensor, size: int) -> torch.Tensor:
            buf = x.new_empty(*x.shape[:-2], size, x.shape[-1])
            buf[..., : x.shape[-2], :] = x
            return buf


def _template_prefix(lm: LoadedModel) -> tuple[int, ...]:
    """Tokens the chat template puts before any user message (the longest prefix shared by two
    different one-message chats); () if the template can't tell."""
    try:
        a = lm.chat_ids([{"role": "user", "content": "a"}])
        b = lm.chat_ids([{"role": "user", "content": "b"}])
    except Exception:  # a template that rejects these messages: no prefix reuse
        return ()
    n = _shared_len(a, b)
    return tuple(a[:n]) if n >= 4 else ()


def _shared_len(a, b) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _copy_cache(cache):
    """A shallow copy of a cache of plain layers whose tensors can then be replaced."""
    new = copy.copy(cache)
    new.layers = [copy.copy(layer) for layer in cache.layers]
    return new
