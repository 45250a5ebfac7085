"""Prometheus metrics of the gateway (prometheus-client), on a registry per app.

Account names are label values only when ``account_labels`` is on: with thousands of accounts
they would explode the series count of every scraper (cardinality).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
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
        self.countermeasures_unavailable = Counter(
            "distillguard_countermeasures_unavailable",
            "Countermeasures asked for (the account's watermark, a policy action) that the "
            "backend cannot apply, so answers went without them, by countermeasure",
            ["countermeasure"],
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

    def watch(self, ledger, monitor=None) -> None:
        """Export the ledger writer's (and the online monitor's) health at every scrape: a dead
        or wedged writer makes the gateway answer 503, and an operator's alert should fire on
        the metric before users report it."""
        self.registry.register(_HealthCollector(ledger, monitor))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _HealthCollector:
    """Read at scrape time from the objects themselves (prometheus-client's custom-collector
    idiom), so nothing on the request path updates them."""

    def __init__(self, ledger, monitor):
        self.ledger = ledger
        self.monitor = monitor

    def collect(self):
        ledger = self.ledger
        yield GaugeMetricFamily(
            "distillguard_ledger_up",
            "1 while the ledger writer takes rows; 0 while it is dead or wedged (requests get 503)",
            value=0 if ledger.problem() else 1,
        )
        yield GaugeMetricFamily(
            "distillguard_ledger_queue_rows",
            "Ledger rows queued for the writer, not yet committed",
            value=ledger._queue.qsize(),
        )
        yield CounterMetricFamily(
            "distillguard_ledger_rows_written", "Ledger rows committed", value=ledger.rows_written
        )
        yield CounterMetricFamily(
            "distillguard_ledger_rows_refused",
            "Ledger rows the database would not store (each answered 503)",
            value=ledger.rows_refused,
        )
        if ledger.last_commit is not None:
            yield GaugeMetricFamily(
                "distillguard_ledger_seconds_since_commit",
                "Seconds since the ledger's last successful commit",
                value=time.monotonic() - ledger.last_commit,
            )
        if self.monitor is not None:
            yield CounterMetricFamily(
                "distillguard_monitor_errors",
                "Batches of finished requests online detection failed on, and verdicts it "
                "refused for a score that is not a finite number",
                value=getattr(self.monitor, "errors", 0),
            )
