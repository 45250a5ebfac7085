"""Labelled evaluation traffic: benign users and extraction campaigns in the traffic-log format.

:func:`generate_traffic` turns one :class:`TrafficConfig` into traffic-log records (DESIGN.md
"Traffic log"), oldest first::

    {"ts": 1793577600.0, "account": "acct-1f3a9c20", "ip": "81.4.12.9",
     "request": {"model": "smollm2", "messages": [...], ...},      # valid for serve.schemas
     "response": {"status": 200, "usage": {"prompt_tokens": 31, "completion_tokens": 212}},
     "label": "benign" | "<campaign kind>", "campaign": "<kind>-<i>"}    # campaign rows only

Account names are neutral hashes (nothing in them tells benign from attacker); ``label`` and
``campaign`` are ground truth for evaluation and detectors must not read them.

Benign users (``benign.py``) replay the ``pool`` half of the benign ShareGPT conversations with
human timing; campaigns (``campaigns.py``) are registered generators that draw their seed text
from the disjoint ``attack`` pool (``pools.py``) and from templates. Everything is deterministic
for a seed: each user and each campaign has its own random stream, so adding a campaign does not
change the benign traffic.

Usage is an estimate (no model is called): prompt tokens from the message text (~4 characters a
token, one per non-ASCII character), completion tokens from the length of the real ShareGPT
answer where there is one, capped by ``max_tokens``, times ``n``.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Annotated, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from distillguard.errors import ConfigError

DEFAULT_START = 1_793_577_600.0  # 2026-11-02 00:00 UTC (a Monday): fixed, so files are reproducible
ENTRY_POINT_GROUP = "distillguard.campaigns"


# ---- configuration -----------------------------------------------------------------------


class CampaignSpec(BaseModel):
    """One campaign: a registered ``kind``, its number of accounts and requests per account."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: str = Field(description="a registered campaign kind (see campaign_kinds())")
    accounts: Annotated[int, Field(ge=1, le=100_000)] | None = Field(
        None, description="accounts the actor uses (default: the kind's, e.g. 20 for hydra)"
    )
    requests: Annotated[int, Field(ge=1, le=10_000_000)] | None = Field(
        None, description="requests per account (default: the kind's)"
    )

    @classmethod
    def parse(cls, text: str) -> CampaignSpec:
        """``KIND[:ACCOUNTS[:REQUESTS]]``, e.g. ``bulk``, ``hydra:30``, ``template:1:500``."""
        parts = text.strip().split(":")
        kinds = campaign_kinds()
        if not parts[0] or len(parts) > 3:
            raise ConfigError(
                f"bad campaign {text!r}: expected KIND[:ACCOUNTS[:REQUESTS]], e.g. hydra:20"
            )
        if parts[0] not in kinds:
            raise ConfigError(
                f"unknown campaign kind {parts[0]!r} in {text!r}; known kinds: {', '.join(kinds)}"
            )
        numbers = []
        for what, value in zip(("ACCOUNTS", "REQUESTS"), parts[1:]):
            if not value.isdigit() or int(value) < 1:
                raise ConfigError(
                    f"bad campaign {text!r}: {what} must be a positive integer, got {value!r}"
                )
            numbers.append(int(value))
        return cls(
            kind=parts[0],
            accounts=numbers[0] if numbers else None,
            requests=numbers[1] if len(numbers) > 1 else None,
        )

    @field_validator("kind")
    @classmethod
    def _known(cls, kind: str) -> str:
        if kind not in campaign_kinds():
            raise ValueError(
                f"unknown campaign kind {kind!r}; known kinds: {', '.join(campaign_kinds())}"
            )
        return kind


class TrafficConfig(BaseModel):
    """Everything :func:`generate_traffic` needs; the same config always gives the same records."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    benign_accounts: Annotated[int, Field(ge=0, le=1_000_000)] = Field(
        100, description="benign users replayed from the ShareGPT pool"
    )
    campaigns: tuple[CampaignSpec, ...] = Field(
        (), description="attack campaigns, each with its own accounts"
    )
    seed: int = Field(0, description="random seed: same seed, same traffic")
    days: Annotated[float, Field(gt=0, le=366)] = Field(
        3.0, description="length of the traffic window in days"
    )
    pool: Literal["calibration", "eval"] = Field(
        "eval",
        description="which disjoint benign pool the benign users draw on: fit detectors on a "
        "'calibration' file, evaluate them on an 'eval' file",
    )
    start: float = Field(DEFAULT_START, description="start of the window (unix seconds, UTC)")
    model: Annotated[str, Field(min_length=1)] = Field(
        "smollm2", description="model id every request names"
    )
    rpm_limit: Annotated[int, Field(ge=1, le=100_000)] = Field(
        20,
        description="the gateway's per-account requests per minute: campaigns that stay under "
        "limits (hydra) keep every account below it in every 60 s window",
    )

    whole_conversations: bool = Field(
        False,
        description="benign users replay ShareGPT's long conversations whole (its parts abc_0, abc_1, ... "
        "joined, so follow-ups carry their history) in sessions that end after their time. "
        "More realistic, but the pools then last ~500 (calibration) and ~400 (eval) users over "
        "3 days; off, each part is a conversation of its own and sessions run to the end of "
        "their conversations, as the README's detection numbers were measured",
    )
    popular_prompts: Annotated[int, Field(ge=0, le=100_000)] = Field(
        0,
        description="size of a public prompt set (attack-pool first turns, which the sweeping campaigns "
        "also send) that benign users open conversations with, drawn Zipf-popular: many users "
        "send the popular ones. 0: off (the README's detection numbers)",
    )
    popular_share: Annotated[float, Field(ge=0, le=1)] = Field(
        0.2,
        description="share of a benign user's conversations opened with a public prompt (with popular_prompts)",
    )
    popular_zipf: Annotated[float, Field(ge=0, le=4)] = Field(
        1.0,
        description="Zipf exponent of the public prompts' popularity: rank r drawn with weight r^-s",
    )
    app_share: Annotated[float, Field(ge=0, le=0.5)] = Field(
        0.03,
        description="share of benign users that are apps built on the API: one app's system prompt on "
        "every request, shared with the other users of that app",
    )
    apps: Annotated[int, Field(ge=1, le=10_000)] = Field(
        3, description="distinct apps the app users belong to"
    )
    nat_share: Annotated[float, Field(ge=0, le=1)] = Field(
        0.0,
        description="share of benign users behind a large NAT (a university, a company VPN): their home "
        "address is in the NAT's /24, shared with up to nat_size others (0: off)",
    )
    nat_size: Annotated[int, Field(ge=2, le=1_000_000)] = Field(
        200, description="users behind one large NAT"
    )
    decoy_share: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.5,
        description="share of a hydra key's requests that are benign-looking conversations "
        "(0.5-0.95 puts attackers at 5-50% of their own keys' traffic)",
    )

    @field_validator("campaigns", mode="before")
    @classmethod
    def _parse_specs(cls, value):
        if isinstance(value, str):
            value = [value]
        return tuple(CampaignSpec.parse(v) if isinstance(v, str) else v for v in value)

    @model_validator(mode="after")
    def _something(self) -> TrafficConfig:
        if self.benign_accounts == 0 and not self.campaigns:
            raise ValueError("nothing to generate: set benign_accounts > 0 or add a campaign")
        return self

    @property
    def end(self) -> float:
        return self.start + self.days * 86400.0


# ---- the campaign registry (built-ins register the same way plugins do) ------------------


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


_KINDS: dict[str, CampaignKind] = {}
_loaded = False


def register_campaign(
    name: str, *, default_accounts: int = 1, default_requests: int = 1000, description: str = ""
) -> Callable[[CampaignGenerator], CampaignGenerator]:
    """Decorator: register ``fn(ctx) -> Iterator[Call]`` as campaign kind ``name``.

    Plugins register from a module named by an entry point in the ``distillguard.campaigns``
    group; the built-ins (``campaigns.py``) use this same decorator.
    """
    if not name or ":" in name or name == "benign":
        raise ConfigError(
            f"campaign kind {name!r}: must be non-empty, without ':', and not 'benign'"
        )

    def deco(fn: CampaignGenerator) -> CampaignGenerator:
        _KINDS[name] = CampaignKind(
            name,
            fn,
            default_accounts,
            default_requests,
            description or (fn.__doc__ or "").strip().split("\n")[0],
        )
        return fn

    return deco


def campaign_kinds() -> dict[str, CampaignKind]:
    """Every registered campaign kind: built-ins, then plugins' entry points."""
    global _loaded
    if not _loaded:
        _loaded = True
        from distillguard.arena import campaigns  # noqa: F401 - registers the built-ins

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            ep.load()
    return dict(_KINDS)


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


def _record(call: Call, label: str, campaign: str | None) -> dict:
    req = call.request
    cap = req.get("max_completion_tokens") or req.get("max_tokens")
    per_choice = min(call.completion_tokens, cap) if cap else call.completion_tokens
    record = {
        "ts": round(call.ts, 3),
        "account": call.account,
        "ip": call.ip,
        "request": req,
        "response": {
            "status": 200,
            "usage": {
                "prompt_tokens": prompt_tokens(req["messages"]),
                "completion_tokens": max(1, per_choice) * req.get("n", 1),
            },
        },
        "label": label,
    }
    if campaign is not None:
        record["campaign"] = campaign
    return record


def iter_traffic(config: TrafficConfig) -> Iterator[dict]:
    """The traffic of ``config``, oldest first (ties broken by account, then generation order)."""
    return iter(generate_traffic(config))


def generate_traffic(config: TrafficConfig) -> list[dict]:
    """All records of ``config``, sorted by ``ts``. See the module docstring for the format."""
    from distillguard.arena.benign import benign_calls
    from distillguard.arena.pools import load_pools

    pools = load_pools(config.whole_conversations)
    records: list[dict] = []
    for call in benign_calls(config, pools[config.pool]):
        if config.start <= call.ts < config.end:
            records.append(_record(call, "benign", None))
    kinds = campaign_kinds()
    for i, spec in enumerate(config.campaigns, 1):
        kind = kinds[spec.kind]
        cid = f"{spec.kind}-{i}"
        n_accounts = spec.accounts or kind.default_accounts
        ctx = CampaignContext(
            campaign_id=cid,
            kind=spec.kind,
            accounts=tuple(account_id(config.seed, cid, j) for j in range(n_accounts)),
            requests_per_account=spec.requests or kind.default_requests,
            start=config.start,
            end=config.end,
            rpm_limit=config.rpm_limit,
            decoy_share=config.decoy_share,
            model=config.model,
            rng=stream_rng(config.seed, cid),
            attack=pools["attack"],
        )
        for call in kind.generate(ctx):
            if config.start <= call.ts < config.end:
                records.append(_record(call, spec.kind, cid))
    records.sort(key=lambda r: (r["ts"], r["account"]))  # stable: generation order breaks ties
    return records
