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

from collections.abc import Iterator
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# The generator contract lives in base.py (below this module, benign.py and campaigns.py);
# these names are re-exported here, where callers have always imported them from.
from distillguard.arena.base import (  # noqa: F401
    CAMPAIGNS,
    ENTRY_POINT_GROUP,
    Call,
    CampaignContext,
    CampaignGenerator,
    CampaignKind,
    account_id,
    campaign_kinds,
    estimate_tokens,
    prompt_tokens,
    random_ip,
    register_campaign,
    stream_rng,
)
from distillguard.arena.benign import benign_calls
from distillguard.arena.pools import load_pools
from distillguard.errors import ConfigError

DEFAULT_START = 1_793_577_600.0  # 2026-11-02 00:00 UTC (a Monday): fixed, so files are reproducible


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
            if parts[0] in CAMPAIGNS.errors:
                CAMPAIGNS.get(parts[0])  # raises, with why the installed plugin did not load
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
        "their conversations, as the detection numbers in docs/detection.md were measured",
    )
    popular_prompts: Annotated[int, Field(ge=0, le=100_000)] = Field(
        0,
        description="size of a public prompt set (attack-pool first turns, which the sweeping campaigns "
        "also send) that benign users open conversations with, drawn Zipf-popular: many users "
        "send the popular ones. 0: off (as the detection numbers in docs/detection.md)",
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


# ---- records -------------------------------------------------------------------------------


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
