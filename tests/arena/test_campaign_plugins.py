"""Campaign kinds through a real entry point: an installed plugin is generated like a built-in;
a broken one is reported and the built-ins stay."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from distillguard.arena.base import CAMPAIGNS, ENTRY_POINT_GROUP
from distillguard.arena.traffic import TrafficConfig, generate_traffic
from distillguard.errors import ConfigError
from tests.plugin_dist import install_plugin

PLUGIN = """
from distillguard.arena.base import Call, register_campaign

@register_campaign("ping-plugin", default_accounts=2, default_requests=4)
def ping(ctx):
    for j, account in enumerate(ctx.accounts):
        for r in range(ctx.requests_per_account):
            msg = [{"role": "user", "content": f"ping {r}"}]
            yield Call(ctx.start + 90 * r + j, account, "10.9.8.7", ctx.request(msg), 3)

def plain(ctx):
    '''A bare generator function: default accounts and requests.'''
    for r in range(ctx.requests_per_account):
        yield Call(ctx.start + r, ctx.accounts[0], "10.9.8.6", ctx.request([]), 1)
"""


@pytest.fixture
def plugin(monkeypatch, tmp_path):
    install_plugin(
        monkeypatch,
        tmp_path,
        "dg-ping-campaign",
        {"dg_ping_campaign": PLUGIN, "dg_broken_campaign": "1 / 0\n"},
        {
            ENTRY_POINT_GROUP: {
                "ping-plugin": "dg_ping_campaign:ping",
                "plain-plugin": "dg_ping_campaign:plain",
                "wrong-name": "dg_ping_campaign:ping",
                "broken": "dg_broken_campaign:gen",
            }
        },
    )
    CAMPAIGNS.reload()
    yield
    monkeypatch.undo()
    CAMPAIGNS.remove("ping-plugin")  # its decorator add()-ed it when the module was imported
    CAMPAIGNS.reload()


def test_an_installed_campaign_is_generated_and_a_broken_one_hides_nothing(plugin):
    recs = generate_traffic(TrafficConfig(benign_accounts=0, campaigns=["ping-plugin"]))
    assert len(recs) == 8 and {r["label"] for r in recs} == {"ping-plugin"}
    assert len({r["account"] for r in recs}) == 2  # the kind's default_accounts
    assert CAMPAIGNS.get("plain-plugin").default_requests == 1000
    assert CAMPAIGNS.get("plain-plugin").description.startswith("A bare generator")

    builtins = {"bulk", "template", "reasoning", "logprobs", "slowlow", "hydra"}
    assert builtins <= set(CAMPAIGNS.all())
    assert "ZeroDivisionError" in CAMPAIGNS.errors["broken"]
    assert "make the two names equal" in CAMPAIGNS.errors["wrong-name"]
    with pytest.raises(ConfigError, match="'broken'.*failed to load"):
        CAMPAIGNS.get("broken")
    with pytest.raises(ConfigError, match="'broken'.*failed to load.*ZeroDivisionError"):
        TrafficConfig(benign_accounts=0, campaigns=["broken"])
    with pytest.raises(ValidationError, match="unknown campaign kind 'broken'"):
        TrafficConfig(benign_accounts=0, campaigns=[{"kind": "broken"}])


def test_an_uninstalled_campaign_is_unknown_after_reload():
    assert "ping-plugin" not in CAMPAIGNS.all()
    with pytest.raises(ConfigError, match="unknown campaign kind 'ping-plugin'"):
        CAMPAIGNS.get("ping-plugin")
