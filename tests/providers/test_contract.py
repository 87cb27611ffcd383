"""The provider contract: what the cluster relies on, held on every provider alike
(the EC2 provider on a local cloud over HTTP, the SSH provider on real sshd hosts)."""

from __future__ import annotations

import asyncio
import math
import subprocess
import time
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from dask_rawvm.errors import ProviderError
from dask_rawvm.providers.base import (
    CLUSTER_TAG,
    LIVE_STATES,
    ROLE_TAG,
    LaunchSpec,
    Machine,
    WorkerSize,
)

SCRIPT = "#!/bin/bash\nexec sleep 300\n"
pytestmark = pytest.mark.timeout(180)


def spec(subject: Any, count: int) -> LaunchSpec:
    return LaunchSpec("worker", subject.vm_type, SCRIPT, count, {"team": "x"}, batch="b")


async def live_ids(subject: Any) -> set[str]:
    return {m.id for m in await subject.provider.live_machines(subject.cluster)}


async def eventually(
    condition: Callable[[], Awaitable[bool]], what: str, timeout: float = 60
) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def test_launch_describe_live_terminate(subject: Any) -> None:
    provider = subject.provider
    machines: list[Machine] = await provider.launch(spec(subject, 3))
    ids = [m.id for m in machines]
    assert len(set(ids)) == 3
    for machine in machines:
        assert machine.tags[CLUSTER_TAG] == subject.cluster
        assert machine.tags[ROLE_TAG] == "worker" and machine.tags["team"] == "x"
        assert machine.state in LIVE_STATES
    # Names: by launch index, or from a map written after launch.
    if not provider.names_after_launch:
        assert sorted(m.launch_index for m in machines) == [0, 1, 2]
    described = await provider.describe(ids)
    assert {m.id for m in described} == set(ids)
    assert all(m.state in ("pending", "running") for m in described)
    assert await live_ids(subject) == set(ids)

    await provider.terminate(ids[:1])

    async def first_gone() -> bool:
        (machine,) = await provider.describe(ids[:1])
        return machine.state not in ("pending", "running")

    await eventually(first_gone, "the terminated machine to leave")
    await eventually(lambda: _equals(live_ids(subject), set(ids[1:])), "live machines")


async def test_files_stored_are_fetched_back_and_by_url(subject: Any, tmp_path: Path) -> None:
    provider = subject.provider
    path = tmp_path / "bundle.tar.gz"
    path.write_bytes(b"\x00bundle" * 1000)
    await provider.store("environments/abc.tar.gz", str(path))
    await provider.store_bytes("names/b.txt", b"m-1 worker-0\n")
    assert await provider.fetch("environments/abc.tar.gz") == path.read_bytes()
    assert await provider.fetch("names/b.txt") == b"m-1 worker-0\n"
    url = await provider.url_for("environments/abc.tar.gz", expires=600)
    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert body == path.read_bytes()


async def test_cleanup_by_tag_removes_every_machine(subject: Any) -> None:
    provider = subject.provider
    launched = {m.id for m in await provider.launch(spec(subject, 2))}
    assert set(await provider.cleanup(subject.cluster)) == launched
    await eventually(lambda: _equals(live_ids(subject), set()), "no live machine")


async def test_cleanup_from_synchronous_code(subject: Any) -> None:
    """What an unclosed cluster's finalizer runs at exit: no event loop of the cluster's."""
    provider = subject.provider
    launched = {m.id for m in await provider.launch(spec(subject, 2))}
    assert set(await asyncio.to_thread(provider.cleanup_blocking)) == launched
    await eventually(lambda: _equals(live_ids(subject), set()), "no live machine")


async def test_capacity_is_stated_and_checked(subject: Any) -> None:
    provider = subject.provider
    assert provider.capacity > 0
    provider.check_capacity(1)
    if not math.isinf(provider.capacity):
        provider.check_capacity(int(provider.capacity))
        with pytest.raises(ProviderError, match=f"asked for {int(provider.capacity) + 1}"):
            provider.check_capacity(int(provider.capacity) + 1)


def test_the_boot_prelude_says_who_the_machine_is(subject: Any) -> None:
    prelude = subject.provider.boot_prelude()
    assert "INSTANCE_ID=" in prelude and "ADDRESS=" in prelude
    assert "launch_index()" in prelude
    subprocess.run(["bash", "-n"], input=prelude.encode(), check=True)


async def _equals(awaitable: Awaitable[set[str]], expected: set[str]) -> bool:
    return await awaitable == expected


def test_worker_size_is_what_one_worker_has_to_itself(subject: Any) -> None:
    size = subject.provider.worker_size(subject.vm_type)
    if subject.vm_type == "t3.micro":  # EC2: the type's vCPUs and memory, from the catalog
        assert size == WorkerSize(2, 2**30)
    else:  # SSH: the lab's hosts (this machine), shared by workers_per_host=2
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True).stdout)
        memory = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
        assert size == WorkerSize(max(1, nproc // 2), int(memory) * 1024 // 2)
