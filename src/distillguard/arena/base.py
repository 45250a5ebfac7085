"""What every traffic generator shares: the :class:`Call` it emits, its random streams, addresses
and token estimates; the campaign contract (:class:`CampaignContext`, :class:`CampaignKind`) and
the campaign registry.

Campaign kinds are plugins of the entry-point group ``distillguard.campaigns`` (read by
:class:`distillguard.plugins.Registry`); the built-ins in ``campaigns.py`` are entry points of
distillguard's own ``pyproject.toml``, so a new kind is one module plus one line::

    [project.entry-points."distillguard.campaigns"]
    mykind = "my_package.my_module:mykind"     # a generator decorated with @register_campaign

This module sits below ``traffic.py``, ``benign.py`` and ``campaigns.py`` so that each of them
imports it and none imports another's importer (no import cycle).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from distillguard.errors import ConfigError
from distillguard.plugins import Registry

ENTRY_POINT_GROUP = "distillguard.campaigns"


class Call(NamedTuple):
    """One request a generator emits; :func:`generate_traffic` adds usage, label and campaign."""

    ts: float
    account: str
    ip: str
    request: dict
    completion_tokens: int  # per choice, before the max_tokens cap


@dataclass(frozen=True)
class CampaignContext:
    """What a campaign generator gets: its accounts, window, limits, randomness and seed text."""

    campaign_id: str  # "<kind>-<i>", i counting the config's campaigns from 1
    kind: str
    accounts: tuple[str, ...]
    requests_per_account: int
    start: float
    end: float
    rpm_limit: int
    decoy_share: float  # hydra: share of benign-looking requests
    model: str
    rng: random.Random
    attack: tuple  # tuple[pools.Thread, ...]: the attack pool, the only ShareGPT text allowed

    def request(self, messages: list[dict], **params) -> dict:
        """An OpenAI chat request for this config's model (None-valued params left out)."""
        return {
            "model": self.model,
            "messages": messages,
            **{k: v for k, v in params.items() if v is not None},
        }


CampaignGenerator = Callable[[CampaignContext], Iterator[Call]]


@dataclass(frozen=True)
class CampaignKind:
    name: str
    generate: CampaignGenerator
    default_accounts: int
    default_requests: int
    description: str


def _check(name: str, obj: object) -> CampaignKind:
    kind = getattr(obj, "campaign_kind", obj)  # a @register_campaign generator carries its kind
    if not isinstance(kind, CampaignKind):
        if not callable(obj):
            raise ConfigError(f"campaign {name!r} is {obj!r}: expected a generator function")
        kind = CampaignKind(name, obj, 1, 1000, (obj.__doc__ or "").strip().split("\n")[0])
    if kind.name != name:
        raise ConfigError(
            f"campaign entry point {name!r} names a generator registered as {kind.name!r}: "
            f"make the two names equal"
        )
    _check_name(name)
    return kind


def _check_name(name: str) -> None:
    if not name or ":" in name or name == "benign":
        raise ConfigError(
            f"campaign kind {name!r}: must be non-empty, without ':', and not 'benign'"
        )


CAMPAIGNS: Registry[CampaignKind] = Registry(ENTRY_POINT_GROUP, "campaign kind", check=_check)


def register_campaign(
    name: str, *, default_accounts: int = 1, default_requests: int = 1000, description: str = ""
) -> Callable[[CampaignGenerator], CampaignGenerator]:
    """Decorator: make ``fn(ctx) -> Iterator[Call]`` campaign kind ``name``.

    The kind is registered at once (enough for a script or a test) and kept on the function as
    ``fn.campaign_kind``, which is what an entry point naming ``fn`` loads: that is how the
    built-ins and installed plugins are found without importing them first.
    """
    _check_name(name)

    def deco(fn: CampaignGenerator) -> CampaignGenerator:
        kind = CampaignKind(
            name,
            fn,
            default_accounts,
            default_requests,
            description or (fn.__doc__ or "").strip().split("\n")[0],
        )
        fn.campaign_kind = kind  # type: ignore[attr-defined]
        CAMPAIGNS.add(name, kind)
        return fn

    return deco


def campaign_kinds() -> dict[str, CampaignKind]:
    """Every registered campaign kind: built-ins, then plugins' entry points."""
    return CAMPAIGNS.all()


# ---- records -------------------------------------------------------------------------------


def estimate_tokens(text: str) -> int:
    """Cheap token estimate: ~4 ASCII characters a token, one token per other character."""
    ascii_chars = len(text.encode("ascii", "ignore"))
    return max(1, math.ceil(ascii_chars / 4) + (len(text) - ascii_chars))


def prompt_tokens(messages: list[dict]) -> int:
    """Estimated prompt tokens of a chat request: content plus ~4 tokens of template a message."""
    return 3 + sum(4 + estimate_tokens(m["content"]) for m in messages)


def account_id(seed: int, owner: str, index: int) -> str:
    """A neutral account name: a hash of (seed, owner, index), so names carry no label."""
    return "acct-" + hashlib.sha256(f"{seed}|{owner}|{index}".encode()).hexdigest()[:10]


# First octets of public ranges, residential and hosting alike: every generator draws from the same
# list, so an address tells nothing by itself; only sharing (an office NAT, a proxy range) does.
_FIRST_OCTETS = (
    5,
    23,
    24,
    31,
    34,
    45,
    46,
    51,
    62,
    64,
    73,
    77,
    81,
    86,
    91,
    92,
    98,
    104,
    109,
    138,
    151,
    159,
    167,
    176,
    185,
    188,
    193,
    195,
)


def random_ip(rng: random.Random, prefix: str | None = None) -> str:
    """A public-looking IPv4 address, or one in ``prefix`` (a /24 such as "45.83.17")."""
    if prefix is None:
        prefix = f"{rng.choice(_FIRST_OCTETS)}.{rng.randrange(256)}.{rng.randrange(256)}"
    return f"{prefix}.{rng.randrange(2, 254)}"


def stream_rng(seed: int, name: str) -> random.Random:
    """An independent random stream per user or campaign (string seeds hash with SHA-512)."""
    return random.Random(f"distillguard-arena|{seed}|{name}")
