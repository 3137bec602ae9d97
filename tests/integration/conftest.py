"""Integration fixtures: real processes on 127.0.0.1, started once per session, stopped for sure.

Fixtures here only wire tests/support into pytest; the logic lives there.
"""

from __future__ import annotations

import uuid
from collections.abc import Generator, Iterator

import pytest

from tests.support.faultproxy import FaultProxy
from tests.support.moto_region import DEFAULT_SEED, MotoRegion, start_regions
from tests.support.processes import log_tails

PRIMARY_REGION = "us-east-1"
SECONDARY_REGION = "eu-west-1"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On a failure, attach the log tail of every process still running to the test's report."""
    report = yield
    if report.failed:
        for title, tail in log_tails():
            report.sections.append((title, tail))
    return report


# -- moto -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def moto_regions(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, MotoRegion]]:
    """Two moto_server processes, "us-east-1" and "eu-west-1", signature checking on, same IAM key.

    Shared by the whole session: tests must use their own tables (`table_name`) and not stop, kill or
    freeze these processes (start a private MotoRegion for that).
    """
    log_dir = tmp_path_factory.mktemp("moto-logs")
    regions = start_regions([PRIMARY_REGION, SECONDARY_REGION], log_dir, seed=DEFAULT_SEED)
    try:
        yield {region.name: region for region in regions}
    finally:
        for region in regions:
            region.stop()


@pytest.fixture
def primary_region(moto_regions: dict[str, MotoRegion]) -> MotoRegion:
    return moto_regions[PRIMARY_REGION]


@pytest.fixture
def secondary_region(moto_regions: dict[str, MotoRegion]) -> MotoRegion:
    return moto_regions[SECONDARY_REGION]


@pytest.fixture
def table_name(request: pytest.FixtureRequest) -> str:
    """A table name unique to this test (valid DynamoDB name: [a-zA-Z0-9_.-], 3-255 chars)."""
    test = "".join(c if c.isalnum() or c in "_.-" else "-" for c in request.node.name)[:40]
    return f"t-{test}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def proxies(
    moto_regions: dict[str, MotoRegion], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, FaultProxy]]:
    """A fault proxy in front of each session region, per test module (a module may define its own)."""
    log_dir = tmp_path_factory.mktemp("faultproxies")
    with (
        FaultProxy(moto_regions[PRIMARY_REGION].port, log_dir) as home,
        FaultProxy(moto_regions[SECONDARY_REGION].port, log_dir) as other,
    ):
        yield {PRIMARY_REGION: home, SECONDARY_REGION: other}
