"""Launching and naming, against an in-memory provider: no VM, no cloud, milliseconds a test."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import pytest
from memory_provider import Parts, make_parts

from dask_rawvm.errors import ProviderError
from dask_rawvm.machines import WorkerNames, WorkerVM, worker_index
from dask_rawvm.machines.names import contiguous_runs

Factory = Callable[..., Awaitable[Parts]]
SCHEDULER = "tcp://10.0.0.1:8786"


async def launch(parts: Parts, names: list[str]) -> dict[str, object]:
    """Launch workers as one SpecCluster pass does: all at once, concurrently."""
    machines = await asyncio.gather(*(parts.launcher.launch_worker(n, SCHEDULER) for n in names))
    return dict(zip(names, machines, strict=True))


async def test_one_pass_is_one_launch_and_the_names_map_is_written(parts: Parts) -> None:
    names = [f"worker-{i}" for i in range(25)]
    machines = await launch(parts, names)
    assert parts.provider.calls["launch"] == 1
    (spec,) = parts.provider.launches
    assert spec.count == 25 and spec.role == "worker"
    # The VMs of a fleet find their names in a map stored once the cloud answered.
    (key,) = [k for k in parts.provider.files if k.startswith("names/")]
    lines = parts.provider.files[key].decode().splitlines()
    assert sorted(lines) == sorted(f"{m.id} {n}" for n, m in machines.items())  # type: ignore[union-attr]
    assert f"RAWVM_NAMES_URL=memory://{key}" in spec.user_data
    assert {n: parts.ledger.machine_of(n) for n in names} == machines
    assert parts.launcher.waiting == {}


async def test_by_launch_index_each_run_of_consecutive_names_is_one_request(
    parts_factory: Factory,
) -> None:
    parts = await parts_factory(names_after_launch=False)
    await launch(parts, ["worker-0", "worker-1", "worker-5", "worker-6", "worker-9"])
    counts = sorted((s.count, s.user_data) for s in parts.provider.launches)
    assert [c for c, _ in counts] == [1, 2, 2]
    assert all("RAWVM_NAMES_URL=''" in data for _, data in counts)  # named by launch index
    firsts = sorted(int(d.split("RAWVM_FIRST_INDEX=")[1].split()[0]) for _, d in counts)
    assert firsts == [0, 5, 9]


async def test_the_scheduler_boots_the_providers_metadata_prelude(parts: Parts) -> None:
    parts.provider.boot_prelude = lambda: "INSTANCE_ID=from-the-provider\n"  # type: ignore[method-assign]
    await parts.launcher.launch_scheduler()
    (spec,) = parts.provider.launches
    assert spec.role == "scheduler" and spec.count == 1
    assert "INSTANCE_ID=from-the-provider" in spec.user_data


async def test_capacity_found_later_names_the_waiting_workers(parts: Parts) -> None:
    parts.provider.capacity_now = 2
    machines = await launch(parts, [f"worker-{i}" for i in range(5)])
    assert sum(m is not None for m in machines.values()) == 2
    assert sorted(parts.launcher.waiting, key=worker_index) == ["worker-2", "worker-3", "worker-4"]
    (batch,) = parts.provider.asking
    late = parts.provider.land(batch, 2)
    assert [parts.ledger.machine_of(n) for n in ("worker-2", "worker-3")] == late
    assert list(parts.launcher.waiting) == ["worker-4"]
    # The cloud gave up: the cluster hears which workers it goes without.
    parts.provider.give_up(batch)
    assert parts.launcher.waiting == {} and parts.gave_up == [["worker-4"]]
    await asyncio.sleep(0)  # the late batch's name map is written in the background
    key = f"names/{batch}.txt"
    assert len(parts.provider.files[key].decode().splitlines()) == 4


async def test_a_cancelled_worker_stops_its_requests_asking(parts: Parts) -> None:
    parts.provider.capacity_now = 0
    await launch(parts, ["worker-0", "worker-1"])
    (batch,) = parts.provider.asking
    parts.launcher.cancel("worker-0")
    assert parts.provider.stopped == []  # worker-1 still waits on it
    parts.launcher.cancel("worker-1")
    assert parts.provider.stopped == [batch]


async def test_a_lost_spot_worker_is_replaced_on_demand(parts_factory: Factory) -> None:
    parts = await parts_factory(spot_policy="spot_with_fallback")
    await launch(parts, ["worker-0", "worker-1"])
    assert {s.spot_policy for s in parts.provider.launches} == {"spot_with_fallback"}
    parts.launcher.replace_lost("worker-1")  # its spot VM was taken back
    await launch(parts, ["worker-2", "worker-3"])
    policies = sorted((s.spot_policy, s.count) for s in parts.provider.launches[1:])
    assert policies == [("on-demand", 1), ("spot_with_fallback", 1)]


async def test_terminations_of_a_pass_are_one_call(parts: Parts) -> None:
    machines = await launch(parts, [f"worker-{i}" for i in range(10)])
    await asyncio.gather(*(parts.launcher.terminate(m.id) for m in machines.values()))  # type: ignore[union-attr]
    assert parts.provider.calls["terminate"] == 1
    assert parts.ledger.live() == []
    assert parts.ledger.cost_per_hour() == 0


async def test_worker_vms_are_thin_over_the_launcher(parts: Parts) -> None:
    worker = WorkerVM(SCHEDULER, "worker-7", parts.launcher, parts.ledger)
    await worker
    assert worker.machine is not None and worker.machine.id in parts.provider.machines
    await worker.close()
    assert parts.provider.machines[worker.machine.id].state == "terminated"


async def test_a_launch_short_without_late_capacity_is_an_error(parts_factory: Factory) -> None:
    parts = await parts_factory(names_after_launch=False)
    parts.provider.capacity_now = 1
    with pytest.raises(ProviderError, match="asked for 2 worker VMs, the cloud started 1"):
        await launch(parts, ["worker-0", "worker-1"])


async def test_nothing_is_launched_or_terminated_once_closed(parts: Parts) -> None:
    machines = await launch(parts, ["worker-0"])
    await parts.session.close(terminate=False)
    await parts.launcher.terminate(machines["worker-0"].id)  # type: ignore[union-attr]
    assert parts.provider.calls["terminate"] == 0 and parts.provider.calls["close"] == 1
    with pytest.raises(ProviderError, match="not open"):
        await launch(parts, ["worker-1"])


def test_worker_names_are_never_reused() -> None:
    names = WorkerNames()
    assert [names.take() for _ in range(3)] == ["worker-0", "worker-1", "worker-2"]
    names.seen("worker-10")  # adopted from a running cluster
    assert names.next_name == "worker-11" and names.take() == "worker-11"
    assert contiguous_runs(["worker-3", "worker-1", "worker-2", "worker-7"]) == [
        ["worker-1", "worker-2", "worker-3"],
        ["worker-7"],
    ]
    with pytest.raises(ValueError, match="not a dask-rawvm worker name"):
        worker_index("scheduler")


# -- the provider's lifecycle --------------------------------------------------------------------


async def test_a_failed_cleanup_is_logged_with_what_may_be_left(
    parts: Parts, caplog: pytest.LogCaptureFixture
) -> None:
    machines = await launch(parts, ["worker-0", "worker-1"])
    parts.provider.fail_cleanup = True
    with caplog.at_level(logging.ERROR, logger="dask_rawvm.machines.session"):
        assert await parts.session.close(terminate=True) == []
    message = caplog.text
    assert "cleanup failed: the cloud is down" in message
    assert all(m.id in message for m in machines.values())  # type: ignore[union-attr]
    assert "dask-rawvm down mem" in message
    assert parts.provider.calls["close"] == 1  # connections released all the same


async def test_cleanup_records_every_machine_gone(parts: Parts) -> None:
    await launch(parts, ["worker-0", "worker-1"])
    assert len(parts.ledger.live()) == 2
    assert len(await parts.session.close(terminate=True)) == 2
    assert parts.ledger.live() == [] and not parts.session.is_open


async def test_the_exit_sweep_uses_the_providers_blocking_cleanup() -> None:
    parts = make_parts()
    parts.session.sweep_blocking()  # never opened: nothing to do
    assert parts.provider.calls["cleanup_blocking"] == 0
    await parts.session.open()
    await launch(parts, ["worker-0"])
    await asyncio.to_thread(parts.session.sweep_blocking)
    assert parts.provider.calls["cleanup_blocking"] == 1
    assert all(m.state == "terminated" for m in parts.provider.machines.values())
