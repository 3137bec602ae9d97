"""A three-member etcd cluster on loopback, shared by the fleet tests of one module."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from sidecar.fleet.localetcd import LocalEtcdCluster


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalEtcdCluster]:
    cluster = LocalEtcdCluster(3, tmp_path_factory.mktemp("etcd"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop_all()
