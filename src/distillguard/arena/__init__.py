"""Arena: benign users and extraction campaigns played against the guard.

``generate_traffic(TrafficConfig(...))`` writes labelled evaluation traffic (``traffic.py``);
campaign kinds are plugins of the entry-point group ``distillguard.campaigns`` (``CAMPAIGNS``,
``base.py``), built-ins included: a generator decorated with ``register_campaign``.
"""

from distillguard.arena.base import CAMPAIGNS
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
    "CAMPAIGNS",
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
