"""RawVMCluster end to end on the local cloud: real schedulers, workers and VMs."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import time

import dask.array as da
import pytest
from distributed import Client
from helpers import async_wait_for, live_instances, wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.localcloud.faults import is_mutating


def ec2_changes(calls: dict[str, int]) -> int:
    """EC2 calls that change something (S3 actions are named ``s3:...``)."""
    return sum(n for action, n in calls.items() if ":" not in action and is_mutating(action))


def connected(client: Client) -> set[str]:
    return {w["name"] for w in client.scheduler_info()["workers"].values()}


def test_sync_cluster_end_to_end(cloud: LocalCloud) -> None:
    with RawVMCluster(
        n_workers=3, endpoint_url=cloud.endpoint_url, region=cloud.region, death_timeout=20
    ) as cluster:
        name = cluster.cluster_name
        client = cluster.get_client()
        client.wait_for_workers(3, timeout=60)
        # Worker name == spec key, known before boot.
        assert connected(client) == set(cluster.workers) == {"worker-0", "worker-1", "worker-2"}
        assert cluster.dashboard_link.endswith("/status")
        # The scheduler VM runs dask_rawvm.bulk_retire (its sends are wrapped), which the
        # scale-down below goes through.
        assert client.run_on_scheduler(lambda dask_scheduler: "worker_send" in vars(dask_scheduler))

        x = da.arange(1_000_000, chunks=100_000).persist()
        assert int(x.sum().compute()) == 499999500000
        assert client.gather(client.map(lambda i: i + 1, range(10))) == list(range(1, 11))

        before = cloud.calls
        cluster.scale(1)
        wait_for(lambda: len(connected(client)) == 1, 60, "scale(1)")
        assert int(x.sum().compute()) == 499999500000  # persisted data moved, not lost
        assert (cloud.calls - before)["TerminateInstances"] == 1
        wait_for(lambda: len(live_instances(cloud, name)) == 2, 30, "retired VMs terminated")

        cluster.adapt(minimum=1, maximum=3)
        # time.sleep: a function every worker can import (shipping the test
        # module's own functions to the VMs is the environment pipeline's job).
        futures = client.map(time.sleep, [0.5] * 40, pure=False)
        wait_for(lambda: len(connected(client)) > 1, 60, "adapt to scale up")
        client.gather(futures)
        del futures
        wait_for(lambda: len(connected(client)) == 1, 60, "adapt to scale down")
        assert int(x.sum().compute()) == 499999500000
        # Names are never reused: adapt's new workers got fresh ones.
        assert max(int(n.split("-")[1]) for n in cluster._launched) >= 3
    assert live_instances(cloud, name) == []


async def test_async_cluster_end_to_end(cloud: LocalCloud) -> None:
    async with RawVMCluster(
        n_workers=2,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        asynchronous=True,
        death_timeout=20,
    ) as cluster:
        async with Client(cluster, asynchronous=True) as client:
            await client.wait_for_workers(2, timeout=60)
            x = client.persist(da.ones((1000, 1000), chunks=250))
            assert await client.compute(x.sum()) == 1_000_000
            cluster.scale(1)
            await async_wait_for(lambda: len(cluster.scheduler_info["workers"]) == 1, 60)
            assert await client.compute(x.sum()) == 1_000_000
            cluster.scale(2)
            await client.wait_for_workers(2, timeout=60)
            assert "worker-2" in {w["name"] for w in cluster.scheduler_info["workers"].values()}
        name = cluster.cluster_name
    assert await asyncio.to_thread(live_instances, cloud, name) == []


def test_owned_local_cloud_is_torn_down_with_the_cluster() -> None:
    with RawVMCluster(n_workers=1, death_timeout=20) as cluster:
        cluster.get_client().wait_for_workers(1, timeout=60)
        cloud = cluster.provider.cloud  # type: ignore[attr-defined]
        assert cloud is not None
        processes = [vm.process for vm in cloud.runtime.vms.values()]  # type: ignore[union-attr]
        assert len(processes) == 2  # scheduler VM and worker VM
    assert all(p is not None and p.poll() is not None for p in processes)


def test_no_capacity_at_launch_the_cluster_starts_and_keeps_asking(cloud: LocalCloud) -> None:
    # The workers' fleet finds no capacity anywhere: the cluster starts without them,
    # says so, and its background request lands them once capacity is back.
    cloud.inject("CreateFleet", error="InsufficientInstanceCapacity", count=1)
    with RawVMCluster(
        n_workers=2,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        capacity_retry_timeout=120,
    ) as cluster:
        assert sorted(cluster.launcher.waiting) == ["worker-0", "worker-1"]
        assert cluster.instances == {}
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=90)
        assert connected(client) == {"worker-0", "worker-1"}
        assert cloud.calls["CreateFleet"] == 2 and cluster.launcher.waiting == {}
        name = cluster.cluster_name
    assert live_instances(cloud, name) == []


async def test_workers_never_found_leave_the_spec_after_capacity_retry_timeout(
    quiet_cloud: LocalCloud,
) -> None:
    cloud = quiet_cloud
    cloud.inject("CreateFleet", error="InsufficientInstanceCapacity", count=1000)
    async with RawVMCluster(
        n_workers=3,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        capacity_retry_timeout=1,
        asynchronous=True,
    ) as cluster:
        assert len(cluster.worker_spec) == 3
        await async_wait_for(lambda: not cluster.worker_spec, 30, "the spec to give up")
        assert cluster.launcher.waiting == {} and cluster.workers == {}
        # Asking again (adapt's next pass, or scale) gets fresh names.
        cloud.clear_faults()
        cluster.scale(1)
        await cluster._correct_state()
        assert list(cluster.instances) == ["worker-3"]
    assert live_instances(cloud) == []


def test_failed_scheduler_launch_leaves_nothing(cloud: LocalCloud) -> None:
    cloud.inject("CreateFleet", error="VcpuLimitExceeded", message="You have requested more vCPU")
    with pytest.raises(Exception, match="VcpuLimitExceeded: You have requested more vCPU"):
        RawVMCluster(n_workers=2, endpoint_url=cloud.endpoint_url, region=cloud.region)
    assert cloud.calls["CreateFleet"] == 1
    assert live_instances(cloud) == []


def test_scheduler_vm_that_dies_at_boot_surfaces_its_log(broken_image_cloud: LocalCloud) -> None:
    cloud = broken_image_cloud
    with pytest.raises(Exception, match="scheduler did not start") as error:
        RawVMCluster(endpoint_url=cloud.endpoint_url, region=cloud.region)
    message = str(error.value)
    assert "curl: broken image" in message  # the tail of its boot log
    assert "no instance metadata" in message
    assert live_instances(cloud) == []


def test_unknown_instance_type_fails_before_anything_launches(cloud: LocalCloud) -> None:
    with pytest.raises(Exception, match=r"m99x\.gigantic"):
        RawVMCluster(
            n_workers=2,
            endpoint_url=cloud.endpoint_url,
            region=cloud.region,
            worker_vm_type="m99x.gigantic",
        )
    assert ec2_changes(cloud.calls) == 0
    assert live_instances(cloud) == []


def test_missing_region_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    with pytest.raises(Exception, match="no AWS region"):
        RawVMCluster(provider="aws")


async def test_one_launch_call_and_one_terminate_call_per_pass(quiet_cloud: LocalCloud) -> None:
    cloud = quiet_cloud
    async with RawVMCluster(
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        asynchronous=True,
    ) as cluster:
        cloud.reset_calls()
        cluster.scale(25)
        await cluster._correct_state()
        assert cloud.calls["CreateFleet"] == 1
        assert len(cluster.instances) == 25
        # The first launch also creates the cluster's security group (and its rule) and
        # launch template: ceil(N / 1000) + 3 calls.
        assert ec2_changes(cloud.calls) == 4

        cloud.reset_calls()
        cluster.scale(5)
        await cluster._correct_state()
        assert cloud.calls["TerminateInstances"] == 1
        assert ec2_changes(cloud.calls) == 1
        assert len(cluster.instances) == 5

        cloud.reset_calls()
        cluster.scale(8)
        await cluster._correct_state()
        # Later ones: the fleet and a template version carrying this request's user-data.
        assert cloud.calls["CreateFleet"] == 1 and ec2_changes(cloud.calls) == 2
        # Freed names are never handed out again.
        assert set(cluster.workers) - {f"worker-{i}" for i in range(25)} == {
            "worker-25",
            "worker-26",
            "worker-27",
        }
    assert live_instances(cloud) == []


def test_unclosed_cluster_is_cleaned_up_at_interpreter_exit(cloud: LocalCloud) -> None:
    script = textwrap.dedent(f"""
        from dask_rawvm import RawVMCluster
        cluster = RawVMCluster(n_workers=2, endpoint_url={cloud.endpoint_url!r},
                               region={cloud.region!r}, name="forgotten")
        print(len(cluster.instances), flush=True)
        # exits without close()
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert result.stdout.strip() == "2", result.stderr
    assert cloud.calls["CreateFleet"] == 2
    assert live_instances(cloud, "forgotten") == []


def test_worker_that_dies_at_boot_is_an_error_with_its_log_not_a_hang(
    broken_image_cloud: LocalCloud,
) -> None:
    cloud = broken_image_cloud
    began = time.monotonic()
    # Start waits for its workers (wait_for_workers=True): the dead VM fails it.
    with pytest.raises(Exception, match="a worker VM died at boot") as error:
        RawVMCluster(
            n_workers=1,
            endpoint_url=cloud.endpoint_url,
            region=cloud.region,
            scheduler="local",
            worker_start_timeout=300,
        )
    assert time.monotonic() - began < 60  # not the 300 s timeout
    assert "curl: broken image" in str(error.value)
    assert live_instances(cloud) == []  # the failed start terminated what it launched
    # Waiting later, after a start that did not wait, fails the same way.
    with RawVMCluster(
        n_workers=1,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        wait_for_workers=False,
    ) as cluster:
        with pytest.raises(Exception, match="a worker VM died at boot") as error:
            cluster.get_client().wait_for_workers(1, timeout=300)
        assert "curl: broken image" in str(error.value)
