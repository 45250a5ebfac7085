"""Arena: benign users and extraction campaigns played against the guard.

``generate_traffic(TrafficConfig(...))`` writes labelled evaluation traffic (``traffic.py``);
campaign kinds are a registry (``register_campaign``) that plugins extend.
"""

from distillguard.arena.pools import POOLS, load_pools, pool_of, topic_of
from distillguard.arena.traffic import (
    Call,
    CampaignContext,
    CampaignKind,
    CampaignSpec,
    TrafficConfig,
    campaign_kinds,
    estimate_tokens,
    generate_traffic,
    iter_traffic,
    register_campaign,
)

__all__ = [
    "POOLS",
    "Call",
    "CampaignContext",
    "CampaignKind",
    "CampaignSpec",
    "TrafficConfig",
    "campaign_kinds",
    "estimate_tokens",
    "generate_traffic",
    "iter_traffic",
    "load_pools",
    "pool_of",
    "register_campaign",
    "topic_of",
]
