"""Each account's own watermark key, and the master secret that keys them (and canaries)."""

from __future__ import annotations

from dataclasses import replace

from pydantic import SecretStr

from distillguard.guard.keys import KeyRecord
from distillguard.watermark import WatermarkKey, WatermarkParams, account_key
from distillguard.watermark.secret import load_secret


class AccountWatermarks:
    """Per-account watermark keys derived from one master secret (``secret``: the configured one,
    or None for the data dir's file). ``enabled`` False: no watermark, canaries still keyed."""

    def __init__(self, params: WatermarkParams, secret: SecretStr | None, *, enabled: bool = True):
        self.params = params
        self._configured = secret.get_secret_value() if secret else None
        # None says whether to watermark: off, no secret is loaded until a canary needs one
        self._secret = load_secret(self._configured) if enabled else None
        self._keys: dict[tuple[str, float | None], WatermarkKey] = {}
        self._canary_secret: bytes | None = None

    def watermark_for(
        self, key: KeyRecord | None, delta: float | None = None
    ) -> WatermarkKey | None:
        """The account's own watermark key (HMAC of the account id under the master secret);
        ``delta`` overrides the bias (policy ``watermark_boost``: same key, same green lists)."""
        if key is None or self._secret is None:
            return None
        found = self._keys.get((key.account, delta))
        if found is None:
            params = self.params if delta is None else replace(self.params, delta=delta)
            found = account_key(self._secret, key.account, params)
            self._keys[(key.account, delta)] = found
        return found

    def canary_secret(self) -> bytes:
        """The master secret (canaries are keyed by it too); loaded on first use when watermarking
        is off."""
        if self._canary_secret is None:
            self._canary_secret = self._secret or load_secret(self._configured)
        return self._canary_secret


__all__ = ["AccountWatermarks"]
