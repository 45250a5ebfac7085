"""The guard's settings (:class:`GuardConfig`), in a module of their own so that the CLI reads
them, to build ``serve``'s options, without importing the guard (torch, through the watermark).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from distillguard.guard.limits import Price
from distillguard.guard.privacy import LedgerContent


class GuardConfig(BaseSettings):
    """The guard's settings; env ``DISTILLGUARD_*``. The ``serve`` command's guard options read
    their defaults and help from these fields (``distillguard.cli.options``)."""

    model_config = SettingsConfigDict(env_prefix="DISTILLGUARD_", frozen=True, extra="ignore")

    db: str | None = Field(
        None,
        description="ledger database: a file path, sqlite:///FILE or "
        "postgresql+psycopg://USER@HOST/DB (default: user data dir)",
    )
    redis: str | None = Field(
        None, description="redis://HOST:PORT/0 to share rate-limit counters between replicas"
    )
    admin_key: SecretStr | None = Field(None, description="bearer key for /admin routes")
    metrics_account_labels: bool = Field(
        False, description="label Prometheus series by account (cardinality!)"
    )
    key_cache_ttl_s: float = Field(
        2.0, ge=0, description="how long a key lookup is trusted (revocation delay across replicas)"
    )
    watermark: bool = Field(
        True, description="watermark every account's responses with its own key"
    )
    watermark_secret: SecretStr | None = Field(
        None, description="master secret of the per-account keys (default: a file in the data dir)"
    )
    watermark_scheme: str = Field(
        "synthid",
        description="synthid (SynthID-Text tournament) | keyed-hash | lefthash-ref (the reference "
        "scheme)",
    )
    # WatermarkParams' own defaults, written out because importing it loads torch;
    # tests/test_config_options.py fails where they part
    watermark_gamma: float | None = Field(
        None,  # WatermarkParams.gamma
        description="fraction of the vocabulary that is green (green-list schemes; default: the "
        "scheme's own)",
    )
    watermark_delta: float = Field(
        2.25,  # WatermarkParams.delta
        description="logit bias added to green tokens (green-list schemes)",
    )
    policy_file: str | None = Field(
        None,
        description="YAML/JSON policy ladder: actions per verdict level (default: guard/policy.py's "
        "DEFAULT_LADDER; docs/policies.md)",
    )
    # Read by `serve` where it builds the online monitor and the antidistillation direction
    # that the guard is given.
    detect_calibration: str | None = Field(
        None,
        description="calibration file (`distillguard detect --save-calibration`): "
        "score every request online and act on verdicts; 'external': replicas that share a "
        "ledger leave detection to one `distillguard monitor` process and run none here",
    )
    extracting_after: int = Field(
        100, description="flagged requests before a suspect account is 'extracting'"
    )
    # on at 12 h: bench/results/ladder_false_positives.json, docs/policies.md
    extracting_after_s: float | None = Field(
        43200.0,
        gt=0,
        description="seconds: a suspect account flagged again this long after its first flag is "
        "'extracting' however few its flagged requests (a low-and-slow distiller; "
        "docs/policies.md); 'off': count flagged requests only",
    )
    detect_state: str | None = Field(
        None,
        description="directory of the in-process monitor's checkpoint (state + ledger cursor), "
        "shared by every replica on the ledger, so the one taking over goes on from it; "
        "default: LEDGER.detector beside a SQLite ledger file, none otherwise (a takeover "
        "then starts at the ledger's end)",
    )
    detect_lease_ttl_s: float = Field(
        15.0,
        ge=1.0,
        description="seconds without a heartbeat after which a standby replica takes over the "
        "ledger's monitor lease (renewed every third of this)",
    )
    detect_poll_s: float = Field(
        0.25,
        gt=0,
        description="seconds between reads of the ledger for other replicas' requests (this "
        "replica's own wake the monitor at once)",
    )
    antidistill_data: str = Field(
        "sharegpt",
        description="JSONL of {prompt, answer} whose loss antidistillation "
        "sampling keeps high for students (policy action 'antidistill'); "
        "default: 64 real ShareGPT answers",
    )
    verdict_cache_ttl_s: float = Field(
        2.0,
        ge=0,
        description="how long an account's verdict level is trusted (delay across replicas)",
    )
    metrics_auth: Literal["admin", "none"] = Field(
        "admin",
        description="admin: /metrics needs the admin key (what it counts is the operator's business; "
        "Prometheus sends it as authorization.credentials) | none: open to anyone",
    )
    ledger_content: LedgerContent = Field(
        "full",
        description="what the ledger keeps of prompts and answers: full | hashes "
        "(SHA-256 + length of each) | off (lengths only); see "
        "distillguard.guard.privacy for what each costs detection",
    )
    redact: tuple[str, ...] = Field(
        (),
        description="regex whose matches the ledger stores as [REDACTED] (full mode; repeatable)",
    )
    idempotency_claim_ttl_s: float = Field(
        30.0,
        gt=0,
        description="an Idempotency-Key claim not renewed for this long (its replica died mid-request) "
        "is taken over by a retry; live holders renew it every third of this",
    )
    idempotency_ttl_s: float = Field(
        86400.0,
        gt=0,
        description="how long a stored answer is replayed for its Idempotency-Key; after it, "
        "the key is free again and the row deleted (Stripe's keys last 24 h)",
    )
    ledger_wait_s: float = Field(
        30.0,
        gt=0,
        description="longest a request waits for its ledger row to commit "
        "before it is answered 503 ledger_unavailable",
    )
    ledger_wedged_s: float = Field(
        30.0,
        gt=0,
        description="a ledger row queued this long uncommitted makes "
        "/healthz fail and new requests get 503 at once",
    )
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description="model id -> {prompt, completion} USD per 1M tokens, for daily_usd "
        "budgets ('*': every other model); JSON in DISTILLGUARD_PRICES",
    )
