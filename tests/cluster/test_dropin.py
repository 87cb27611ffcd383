"""RawVMCluster where LocalCluster is: distributed's own deployment scenarios, restated.

The scenarios of ``distributed/deploy/tests/test_local.py``, ``test_spec_cluster.py``,
``test_adaptive.py``, ``test_cluster.py`` and the ``Client(cluster)`` parts of
``distributed/tests/test_client.py``, run on the local cloud the way distributed runs
them on LocalCluster: sync and async, real schedulers, workers and VMs. The scheduler
runs in this process (``scheduler="local"``) except where the scenario is about the
scheduler VM. The deliberate differences are in the README ("Where it differs from
LocalCluster").
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import operator
import os
import subprocess
import sys
import textwrap
import time
import weakref
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator
from types import FunctionType, ModuleType
from typing import Any

import boto3
import dask
import dask.datasets
import pytest
from distributed import Client
from distributed.core import Status
from distributed.exceptions import WorkerStartTimeoutError
from helpers import async_wait_for, live_instances, wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.errors import OptionError, WorkerBootTimeoutError
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud

GiB = 2**30
#: t3.large, the default worker type: 2 vCPUs, 8 GiB.
THREADS, MEMORY = 2, 8 * GiB


@pytest.fixture(scope="module")
def shared_cloud() -> Iterator[LocalCloud]:
    """One local cloud for the module's clusters (each cleans up after itself)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
        patch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
        with LocalCloud() as cloud:
            yield cloud


def on(cloud: LocalCloud, **options: Any) -> dict[str, Any]:
    return {"endpoint_url": cloud.endpoint_url, "region": cloud.region, **options}


def local(cloud: LocalCloud, **options: Any) -> dict[str, Any]:
    """A cluster whose scheduler runs here: for scenarios not about the scheduler VM."""
    return on(cloud, scheduler="local", death_timeout=20, **options)


def names(info: dict[str, Any]) -> set[str]:
    return {str(w["name"]) for w in info["workers"].values()}


def is_valid_xml(text: str) -> bool:
    return ElementTree.fromstring(text) is not None


# -- test_local.py: test_simple, test_cores, test_Client_with_local, test_repr, test_close_twice;
# -- test_spec_cluster.py: test_get_logs, test_restart; test_client.py: test_repr_localcluster


def test_sync_cluster_returns_with_its_workers_and_says_what_they_are(
    shared_cloud: LocalCloud,
) -> None:
    cloud = shared_cloud
    with (
        RawVMCluster(n_workers=2, **local(cloud)) as cluster,
        Client(cluster) as client,
    ):
        # Up when the constructor returns, as LocalCluster's workers are.
        nthreads = client.nthreads()
        assert len(nthreads) == 2 and set(nthreads.values()) == {THREADS}
        workers = client.scheduler_info()["workers"]
        assert {w["memory_limit"] for w in workers.values()} == {MEMORY}
        assert names(client.scheduler_info()) == set(cluster.workers)
        assert client.submit(operator.add, 1, 2).result() == 3

        text = repr(cluster)
        assert cluster.scheduler_address in text
        assert "workers=2, threads=4, memory=16.00 GiB" in text
        html = cluster._repr_html_()
        assert is_valid_xml(html)
        assert cluster.scheduler_address in html and "t3.large" in html
        assert cluster.scheduler_address in client._repr_html_()

        # Logs keyed as distributed keys them: by address, with the scheduler's own.
        logs = cluster.get_logs()
        assert set(logs) == {"Cluster", "Scheduler", *workers}
        assert "Register worker" in logs["Scheduler"]
        address = next(iter(workers))
        assert f"worker {workers[address]['name']}" in logs[address]  # its VM's boot log
        assert list(cluster.get_logs(cluster=True, scheduler=False, workers=False)) == ["Cluster"]
        assert list(cluster.get_logs(cluster=False, scheduler=True, workers=False)) == ["Scheduler"]
        assert list(cluster.get_logs(cluster=False, scheduler=False, workers=False)) == []
        assert set(cluster.get_logs(cluster=False, scheduler=False, workers=[address])) == {address}

        # A client of the address alone, as with LocalCluster (the cluster is TLS).
        with Client(cluster.scheduler_address) as by_address:
            assert by_address.submit(operator.mul, 6, 7).result() == 42

        # client.restart(): the same workers come back, no VM launched.
        fleets = cloud.calls["CreateFleet"]
        client.restart()
        assert names(client.scheduler_info()) == {"worker-0", "worker-1"}
        assert cloud.calls["CreateFleet"] == fleets

        name = cluster.cluster_name
        cluster.close()
        cluster.close()  # twice: nothing happens
        assert cluster.status == Status.closed
    assert live_instances(cloud, name) == []


# -- test_local.py: test_scale_up_and_down, test_scale_memory_cores; test_spec_cluster.py:
# -- test_scale, test_scale_cores_memory; test_client.py: test_shutdown_localcluster


async def test_async_cluster_scales_by_count_cores_and_memory(shared_cloud: LocalCloud) -> None:
    cloud = shared_cloud
    async with RawVMCluster(asynchronous=True, **local(cloud)) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            assert not cluster.workers
            # By the workers' threads and memory: the type's (2 threads, 8 GiB each).
            cluster.scale(cores=4)
            assert len(cluster.worker_spec) == 2
            cluster.scale(memory="20 GiB")
            assert len(cluster.worker_spec) == 3
            cluster.scale(cores=1)
            assert len(cluster.worker_spec) == 1
            cluster.scale(memory="17 GiB")
            assert len(cluster.worker_spec) == 3
            cluster.scale(2)
            await cluster
            assert len(cluster.workers) == 2
            await client.wait_for_workers(2, timeout=120)
            assert sum((await client.nthreads()).values()) == 2 * THREADS

            await cluster.scale(1)  # awaitable, as SpecCluster's
            await cluster
            await async_wait_for(lambda: len(cluster.scheduler_info["workers"]) == 1, 60)
            assert len(cluster.workers) == 1

            # Client.shutdown() closes the cluster it was given.
            await client.shutdown()
        assert cluster.status == Status.closed
    assert await asyncio.to_thread(live_instances, cloud, cluster.cluster_name) == []


# -- test_adaptive.py: test_adaptive_config, test_adapt_cores_memory, test_adaptive_local_cluster


def test_adapt_reads_distributed_config_and_scales_by_cores_and_memory(
    shared_cloud: LocalCloud,
) -> None:
    cloud = shared_cloud
    adaptive_config = {
        "distributed.adaptive.interval": "200ms",
        "distributed.adaptive.wait-count": 4,
        "distributed.adaptive.target-duration": "2s",
    }
    with dask.config.set(adaptive_config), RawVMCluster(**local(cloud)) as cluster:
        adaptive = cluster.adapt(maximum=2)
        # The user's config, not ours.
        assert (adaptive.interval, adaptive.wait_count, adaptive.target_duration) == (0.2, 4, 2)
        assert adaptive.minimum == 0 and adaptive.maximum == 2
        with Client(cluster) as client:
            future = client.submit(operator.add, 1, 2)
            assert future.result(timeout=120) == 3  # a worker came for it
            assert names(client.scheduler_info())
            del future
            wait_for(lambda: not names(client.scheduler_info()), 60, "adapt down to zero")
        wait_for(lambda: not live_instances(cloud, cluster.cluster_name), 60, "VMs terminated")

        # What is given wins (and stays for later calls, as distributed's Cluster.adapt keeps
        # its options).
        quiet = cluster.adapt(maximum=2, wait_count=2, interval="1h")
        assert (quiet.wait_count, quiet.interval) == (2, 3600)
        with dask.config.set({"distributed.adaptive.minimum": 1}):
            quiet = cluster.adapt()
            assert quiet.minimum == 1 and quiet.maximum == float("inf")
        # By cores and memory, with 2 threads and 8 GiB a worker.
        quiet = cluster.adapt(minimum_cores=3, maximum_cores=9)
        assert (quiet.minimum, quiet.maximum) == (2, 4)
        quiet = cluster.adapt(minimum_memory="9 GiB", maximum_memory="40 GiB")
        assert (quiet.minimum, quiet.maximum) == (2, 5)
        assert cluster.adapt(minimum_cores=1, minimum_memory="9 GiB", maximum_cores=10).minimum == 2
        quiet.stop()


# -- the same with the scheduler on its own VM (the default): its log is its VM's


def test_a_cluster_without_n_workers_runs_a_dataframe_groupby_and_gives_its_vms_back(
    shared_cloud: LocalCloud, caplog: pytest.LogCaptureFixture
) -> None:
    """The most common first workload on a default cluster: nothing launches before work
    is submitted, workers come for it, go when it is done, and ``scale`` takes over."""
    cloud = shared_cloud
    quick = {"distributed.adaptive.interval": "200ms", "distributed.adaptive.wait-count": 2}
    with dask.config.set(quick), RawVMCluster(**local(cloud)) as cluster:
        assert not cluster.worker_spec and not live_instances(cloud, cluster.cluster_name)
        # Waiting for workers nobody will launch says why, and how.
        with pytest.raises(WorkerStartTimeoutError):
            cluster.wait_for_workers(1, timeout=1)
        assert "submit work, or scale(1) first" in caplog.text
        with Client(cluster) as client:
            df = dask.datasets.timeseries(end="2000-01-08", freq="10s", seed=1)
            result = df.groupby("name").x.mean().compute()
            # The same as this process computes it alone.
            expected = df.groupby("name").x.mean().compute(scheduler="sync")
            assert result.sort_index().equals(expected.sort_index())
            assert 1 <= len(cluster.workers) <= 10  # the default ceiling
            wait_for(lambda: not live_instances(cloud, cluster.cluster_name), 90, "idle -> 0")

            cluster.scale(1)  # the user's count: the cluster stops adapting
            client.wait_for_workers(1, timeout=120)
            assert cluster._adaptive is not None and cluster._adaptive.state == "stopped"
            assert client.submit(operator.add, 1, 2).result(timeout=60) == 3
    assert live_instances(cloud, cluster.cluster_name) == []


def test_scheduler_vm_cluster_logs_repr_and_client_by_address(shared_cloud: LocalCloud) -> None:
    cloud = shared_cloud
    with RawVMCluster(n_workers=1, death_timeout=20, **on(cloud)) as cluster:
        workers = cluster.scheduler_info["workers"]
        assert len(workers) == 1
        (address,) = workers
        logs = cluster.get_logs()
        assert set(logs) == {"Cluster", "Scheduler", address}
        assert "Scheduler at" in logs["Scheduler"]  # the scheduler VM's boot log
        assert set(cluster.get_logs(scheduler=False, cluster=False, workers=["worker-0"])) == {
            address  # by name too, keyed by address
        }
        assert "workers=1, threads=2, memory=8.00 GiB" in repr(cluster)
        html = cluster._repr_html_()
        assert is_valid_xml(html) and "t3.medium" in html  # the scheduler VM's type
        with Client(cluster.scheduler_address) as client:
            assert client.submit(operator.add, 1, 2).result() == 3
        name = cluster.cluster_name
    assert live_instances(cloud, name) == []


# -- test_spec_cluster.py: test_adaptive_killed_worker, test_unexpected_closed_worker


def test_a_killed_worker_is_replaced_and_its_task_recomputed(shared_cloud: LocalCloud) -> None:
    cloud = shared_cloud
    with (
        dask.config.set({"distributed.deploy.lost-worker-timeout": "1s"}),
        RawVMCluster(n_workers=1, **local(cloud)) as cluster,
        Client(cluster) as client,
    ):
        future = client.submit(operator.add, 1, 2)
        assert future.result(timeout=60) == 3
        (victim,) = cluster.instances.values()
        # The VM goes away under the cluster, as one terminated in the EC2 console.
        boto3.client("ec2", **cloud.client_kwargs()).terminate_instances(InstanceIds=[victim])
        wait_for(lambda: "worker-1" in cluster.workers, 60, "a replacement worker")
        assert future.result(timeout=120) == 3  # its result was lost with it: recomputed
        assert names(client.scheduler_info()) == {"worker-1"}  # a new name, never reused
        assert victim not in cluster.instances.values()


# -- test_local.py: test_cluster_names, test_duplicate_clients; test_client.py's
# -- test_get_client_functions_spawn_clusters (two clusters in one process)


def test_two_clusters_at_once_each_with_its_own_ca(shared_cloud: LocalCloud) -> None:
    cloud = shared_cloud
    with (
        RawVMCluster(n_workers=1, **local(cloud)) as first,
        RawVMCluster(n_workers=1, **local(cloud)) as second,
    ):
        assert first.cluster_name != second.cluster_name
        assert first.scheduler_address != second.scheduler_address
        with Client(first.scheduler_address) as a, Client(second.scheduler_address) as b:
            assert a.submit(operator.add, 1, 2).result() == 3
            assert b.submit(operator.add, 2, 3).result() == 5
            assert set(a.nthreads()).isdisjoint(b.nthreads())
        # Each cluster's CA opens that cluster only.
        with pytest.raises(OSError):
            Client(second.scheduler_address, security=first.security, timeout="3s")


# -- test_cluster.py: test_cluster_wait_for_worker; test_client.py: wait_for_workers timeouts


def test_start_that_times_out_says_what_each_vm_was_doing(quiet_cloud: LocalCloud) -> None:
    cloud = quiet_cloud  # VMs stay pending
    began = time.monotonic()
    with pytest.raises(WorkerStartTimeoutError) as error:
        RawVMCluster(
            n_workers=2,
            wait_for_workers=True,  # (the quiet cloud's clusters do not wait by default)
            worker_start_timeout=2,
            environment=None,
            **local(cloud),
        )
    assert time.monotonic() - began < 60
    assert isinstance(error.value, WorkerBootTimeoutError)
    text = str(error.value)
    assert "only 0 of 2 workers connected within 2 s" in text
    assert "worker-0 (i-" in text and "pending): (nothing logged yet)" in text
    assert "wait_for_workers=False" in text  # the fix
    assert live_instances(cloud) == []  # the failed start terminated what it launched

    with RawVMCluster(
        n_workers=1, wait_for_workers=False, environment=None, **local(cloud)
    ) as cluster:
        assert len(cluster.instances) == 1  # launched, not waited for
        with pytest.raises(WorkerStartTimeoutError, match=r"worker-0 \(i-"):
            cluster.wait_for_workers(1, timeout=1)
        with Client(cluster) as client, pytest.raises(WorkerStartTimeoutError, match="pending"):
            client.wait_for_workers(1, timeout=1)


async def test_async_waits_time_out_as_distributeds(quiet_cloud: LocalCloud) -> None:
    cloud = quiet_cloud
    async with RawVMCluster(
        n_workers=1, wait_for_workers=False, environment=None, asynchronous=True, **local(cloud)
    ) as cluster:
        with pytest.raises(WorkerStartTimeoutError, match="worker-0"):
            await cluster.wait_for_workers(1, timeout=1)
        async with Client(cluster, asynchronous=True) as client:
            with pytest.raises(WorkerStartTimeoutError, match="worker-0"):
                await client.wait_for_workers(1, timeout="1s")


# -- test_local.py: test_silent_startup


def test_silent_startup(shared_cloud: LocalCloud) -> None:
    script = textwrap.dedent(f"""
        from dask_rawvm import RawVMCluster
        if __name__ == "__main__":
            with RawVMCluster(n_workers=1, endpoint_url={shared_cloud.endpoint_url!r},
                              region={shared_cloud.region!r}, scheduler="local"):
                pass
    """)
    result = subprocess.run(
        [sys.executable, "-Wi", "-c", script],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert "INFO" not in result.stdout + result.stderr, result.stdout + result.stderr


# -- the README: a dropped cluster is not kept alive (test_local.py: test_cleanup)


def reaches(roots: tuple[Any, ...], target: object) -> bool:
    """Whether ``target`` is reachable from ``roots`` by strong references (modules and
    classes left out; functions only through their closures; not through an event loop,
    which holds every running cluster's tasks: a root of its own, as for LocalCluster)."""
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if obj is target:
            return True
        skipped = (type, ModuleType, weakref.ReferenceType, asyncio.AbstractEventLoop)
        if id(obj) in seen or isinstance(obj, skipped):
            continue
        seen.add(id(obj))
        if isinstance(obj, FunctionType):
            for cell in obj.__closure__ or ():
                with contextlib.suppress(ValueError):  # an empty cell
                    stack.append(cell.cell_contents)
            continue
        stack.extend(gc.get_referents(obj))
    return False


async def test_a_dropped_cluster_is_not_kept_alive(quiet_cloud: LocalCloud) -> None:
    cloud = quiet_cloud
    # Never started, on an EC2 endpoint.
    cluster = RawVMCluster(asynchronous=True, **local(cloud))
    with pytest.raises(OptionError, match="start it first"):
        cluster.scale(cores=4)  # its workers' size comes with the cloud's catalog
    dropped = weakref.ref(cluster)
    del cluster
    gc.collect()
    assert dropped() is None

    # Running, with a request still asking the cloud for capacity in the background:
    # what its garbage-collection finalizer holds must not reach it.
    cloud.inject("CreateFleet", error="InsufficientInstanceCapacity", count=10_000)
    cluster = await RawVMCluster(
        n_workers=1, asynchronous=True, environment=None, capacity_retry_timeout=600, **local(cloud)
    )
    try:
        assert list(cluster.launcher.waiting) == ["worker-0"]
        # What the finalizer calls, with its arguments (not the cluster it watches).
        held = cluster._finalizer.peek()[1:]  # type: ignore[index]
        assert not reaches(held, cluster)
        del held
    finally:
        await cluster.close()
    dropped = weakref.ref(cluster)
    del cluster
    gc.collect()
    assert dropped() is None
