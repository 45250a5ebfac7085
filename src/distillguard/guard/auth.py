"""Who is calling: API keys (looked up by hash, cached briefly) and the admin key."""

from __future__ import annotations

import asyncio
import hmac
import time

from pydantic import SecretStr
from starlette.requests import HTTPConnection

from distillguard.errors import APIError
from distillguard.guard.keys import KeyRecord, KeyStore, hash_key

# Bound the lookup cache's memory under a flood of random keys.
MAX_CACHED_KEYS = 100_000


class AuthError(APIError):
    status_code = 401
    type = "invalid_request_error"


class PermissionDenied(APIError):
    status_code = 403
    type = "permission_error"


def bearer(request: HTTPConnection) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


class Authenticator:
    """Turns a request's bearer key into its :class:`KeyRecord`.

    A lookup is trusted for ``cache_ttl_s`` seconds: the delay before a key revoked on another
    replica stops working there (one revoked through this replica stops at once,
    :meth:`forget_key`)."""

    def __init__(self, keys: KeyStore, admin_key: SecretStr | None, cache_ttl_s: float):
        self.keys = keys
        self.admin_key = admin_key
        self.cache_ttl_s = cache_ttl_s
        self._cache: dict[str, tuple[KeyRecord | None, float]] = {}

    async def authenticate(self, request: HTTPConnection) -> KeyRecord:
        secret = bearer(request)
        if secret is None:
            raise AuthError(
                "You didn't provide an API key. Send it as 'Authorization: Bearer KEY' "
                "(create one with `distillguard keys create --account NAME`).",
                code="missing_api_key",
            )
        digest = hash_key(secret)
        cached = self._cache.get(digest)
        if cached is not None and cached[1] > time.monotonic():
            record = cached[0]
        else:
            record = await asyncio.to_thread(self.keys.lookup, secret)
            if len(self._cache) > MAX_CACHED_KEYS:
                self._cache.clear()
            self._cache[digest] = (record, time.monotonic() + self.cache_ttl_s)
        if record is None:
            raise AuthError("Incorrect or revoked API key provided.", code="invalid_api_key")
        if record.expired():  # checked on every request: a cached record expires on time too
            at = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.expires_at))
            raise AuthError(
                f"API key {record.id} ({record.prefix}...) expired at {at}. Use the key that "
                "replaced it, or ask the provider for a new one.",
                code="expired_api_key",
            )
        return record

    def forget_key(self, key_id: str) -> None:
        """Drop a key from the lookup cache (after revocation through this replica)."""
        self._cache = {d: v for d, v in self._cache.items() if v[0] is None or v[0].id != key_id}

    def forget_account(self, account: str) -> None:
        """Drop an account's keys from the lookup cache (after its limits changed here)."""
        self._cache = {
            d: v for d, v in self._cache.items() if v[0] is None or v[0].account != account
        }

    def is_admin(self, request: HTTPConnection) -> bool:
        secret = bearer(request)
        admin = self.admin_key.get_secret_value() if self.admin_key else None
        return bool(secret and admin and hmac.compare_digest(secret.encode(), admin.encode()))


__all__ = ["AuthError", "Authenticator", "PermissionDenied", "bearer"]
