"""Fixtures shared by the forensics tests."""

from __future__ import annotations

import pytest

from tests.forensics.report_case import build_report_case


@pytest.fixture(scope="session")
def report_case(tmp_path_factory):
    """(root, {name: model dir}) of the report's case (tests/forensics/report_case.py), trained
    once for the session: the report's tests and the API-only canary test question the same
    student."""
    return build_report_case(tmp_path_factory.mktemp("report-case"))
