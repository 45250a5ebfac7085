"""Prometheus metrics of the gateway (prometheus-client), on a registry per app.

Account names are label values only when ``account_labels`` is on: with thousands of accounts
they would explode the series count of every scraper (cardinality).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, *, account_labels: bool = False):
        self.account_labels = account_labels
        self.registry = CollectorRegistry()
        extra = ["account"] if account_labels else []
        self.requests = Counter(
            "distillguard_requests",
            "Chat completion requests by HTTP status",
            ["status", *extra],
            registry=self.registry,
        )
        self.tokens = Counter(
            "distillguard_tokens", "Tokens served", ["kind", *extra], registry=self.registry
        )
        self.latency = Histogram(
            "distillguard_request_seconds",
            "Request latency (to the last byte)",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "distillguard_rate_limited",
            "Requests refused with 429, by limit",
            ["limit"],
            registry=self.registry,
        )
        self.policy_actions = Counter(
            "distillguard_policy_actions",
            "Countermeasures applied, by action",
            ["action"],
            registry=self.registry,
        )
        self.verdicts = Counter(
            "distillguard_verdicts",
            "Verdicts recorded, by level and source",
            ["level", "source"],
            registry=self.registry,
        )
        self.alert_failures = Counter(
            "distillguard_alert_failures", "Alert webhook calls that failed", registry=self.registry
        )

    def observe(
        self,
        *,
        status: int,
        account: str | None,
        prompt_tokens: int | None,
        completion_tokens: int | None,
        seconds: float,
    ) -> None:
        extra = {"account": account or "-"} if self.account_labels else {}
        self.requests.labels(status=str(status), **extra).inc()
        if prompt_tokens:
            self.tokens.labels(kind="prompt", **extra).inc(prompt_tokens)
        if completion_tokens:
            self.tokens.labels(kind="completion", **extra).inc(completion_tokens)
        self.latency.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
