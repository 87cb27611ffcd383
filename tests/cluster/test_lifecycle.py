"""A lifecycle a data scientist can trust: adapt, reconnect, spot interruptions, no orphans."""

from __future__ import annotations

import os
import signal
import textwrap
import time

import boto3
import dask
import dask.array as da
import pytest
from helpers import async_wait_for, client_process, live_instances, standalone_cloud, wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.config import resolve_options
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.providers.base import CLUSTER_TAG


def names(client) -> set[str]:
    return {w["name"] for w in client.scheduler_info()["workers"].values()}


def test_adapt_scales_to_zero_when_idle_and_back_up_under_load(cloud: LocalCloud) -> None:
    with RawVMCluster(
        endpoint_url=cloud.endpoint_url, region=cloud.region, scheduler="local"
    ) as cluster:
        client = cluster.get_client()
        cluster.adapt(minimum=0, maximum=2)
        assert client.submit(lambda: 42, pure=False).result(timeout=120) == 42
        wait_for(lambda: not names(client) and not live_instances(cloud), 60, "scale to zero")
        futures = client.map(time.sleep, [0.5] * 20, pure=False)
        wait_for(lambda: len(names(client)) >= 1, 120, "scale up again under load")
        client.gather(futures)
        # Every worker this cluster ever had got a new name.
        assert len(cluster._launched) == len(set(cluster._launched))


def test_pending_vms_are_cancelled_first_when_the_target_drops(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with (
        LocalCloud(boot_delay=3600) as cloud,
        RawVMCluster(
            endpoint_url=cloud.endpoint_url, region=cloud.region, scheduler="local"
        ) as cluster,
    ):
        client = cluster.get_client()
        cluster.adapt(minimum=0, maximum=3)
        futures = client.map(time.sleep, [1] * 30, pure=False)
        wait_for(lambda: len(live_instances(cloud)) > 0, 60, "VMs requested")
        client.cancel(futures)
        del futures
        wait_for(lambda: not live_instances(cloud), 60, "requested VMs cancelled")
        assert cloud.calls["TerminateInstances"] >= 1


def test_named_cluster_reconnects_instead_of_starting_another(cloud: LocalCloud) -> None:
    options = {"endpoint_url": cloud.endpoint_url, "region": cloud.region, "name": "prod"}
    first = RawVMCluster(n_workers=2, shutdown_on_close=False, **options)
    client = first.get_client()
    client.wait_for_workers(2, timeout=120)
    data = client.persist(da.arange(1000, chunks=100))
    client.publish_dataset(numbers=data)
    address = first.scheduler_address
    client.close()
    first.close()  # leaves the cluster running
    assert len(live_instances(cloud, "prod")) == 3

    launched = cloud.calls["CreateFleet"]
    with RawVMCluster(**options) as second:
        assert second.scheduler_address == address
        assert sorted(second.workers) == ["worker-0", "worker-1"]
        assert cloud.calls["CreateFleet"] == launched  # nothing new launched
        # The VMs it found are metered from their launch, by market and type.
        assert second.cost_per_hour > 0 and second.spent > 0
        assert sum(line.running for line in second.cost_report().lines) == 3
        client = second.get_client()
        assert int(client.get_dataset("numbers").sum().compute()) == 499500
        second.scale(3)
        client.wait_for_workers(3, timeout=120)
        assert "worker-2" in names(client)  # a fresh name, after the adopted ones
        assert len(resources_of(cloud, "prod")["buckets"]) == 1  # the cluster's, not another
    assert live_instances(cloud, "prod") == []


def resources_of(cloud: LocalCloud, cluster: str) -> dict[str, list[str]]:
    """What the cloud holds of a cluster, by its tag, asked of the APIs themselves."""
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    s3 = boto3.client("s3", **cloud.client_kwargs())
    tag = [{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
    buckets = []
    for bucket in (b["Name"] for b in s3.list_buckets()["Buckets"]):
        tags = s3.get_bucket_tagging(Bucket=bucket).get("TagSet", [])
        if {"Key": CLUSTER_TAG, "Value": cluster} in tags:
            buckets.append(bucket)
    return {
        "instances": [i["InstanceId"] for i in live_instances(cloud, cluster)],
        "buckets": buckets,
        "templates": [
            t["LaunchTemplateId"]
            for t in ec2.describe_launch_templates(Filters=tag)["LaunchTemplates"]
        ],
        "groups": [
            g["GroupId"] for g in ec2.describe_security_groups(Filters=tag)["SecurityGroups"]
        ],
    }


def test_a_kept_cluster_that_shut_itself_down_is_reaped_at_the_next_start(
    cloud: LocalCloud,
) -> None:
    options = {"endpoint_url": cloud.endpoint_url, "region": cloud.region}
    kept = RawVMCluster(
        n_workers=1,
        name="kept",
        shutdown_on_close=False,
        idle_timeout=3,
        death_timeout=20,  # under load a worker may take a while to reach its scheduler
        **options,
    )
    client = kept.get_client()
    client.wait_for_workers(1, timeout=120)
    client.close()
    kept.close()  # the client leaves; the cluster idles out on its own
    wait_for(lambda: not live_instances(cloud, "kept"), 120, "the kept cluster shut itself down")
    left = resources_of(cloud, "kept")
    assert left["buckets"] and left["templates"] and left["groups"]  # nobody closed it

    # The next start in the region removes what the gone cluster left, beside its own start.
    with RawVMCluster(scheduler="local", **options):
        wait_for(lambda: not any(resources_of(cloud, "kept").values()), 60, "the reaping")


def test_spot_interruption_moves_data_and_replaces_the_worker_on_demand(
    cloud: LocalCloud,
) -> None:
    with RawVMCluster(
        n_workers=3,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        spot_policy="spot_with_fallback",
    ) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(3, timeout=120)
        assert {m.market for m in cluster.ledger.assigned.values()} == {"spot"}
        data = client.persist(da.random.random((600, 600), chunks=100))
        expected = float(data.sum().compute())
        victim = max(client.has_what().items(), key=lambda kv: len(kv[1]))[0]
        victim_name = client.scheduler_info()["workers"][victim]["name"]
        cloud.interrupt(cluster.instances[victim_name], delay=20)
        wait_for(lambda: victim_name not in names(client), 30, "the interrupted worker retired")
        # Its data moved before its VM went: nothing is recomputed or lost.
        assert all(who for who in client.who_has(data).values())
        assert float(data.sum().compute()) == pytest.approx(expected)
        survivors = names(client)
        wait_for(lambda: len(names(client)) == 3, 120, "a replacement worker")
        (replacement,) = names(client) - survivors
        assert replacement != victim_name  # under a new name
        # Spot capacity was just taken back: the policy falls back, so on-demand.
        assert cluster.ledger.assigned[replacement].market == "on-demand"


def test_killed_client_leaves_nothing_running(tmp_path) -> None:
    script = textwrap.dedent("""
        import sys
        from dask_rawvm import RawVMCluster
        cluster = RawVMCluster(n_workers=2, endpoint_url=sys.argv[1], region="us-east-1",
                               name="abandoned", idle_timeout="6s", death_timeout="20s")
        cluster.get_client().wait_for_workers(2, timeout=120)
        print("ready", flush=True)
        import time
        time.sleep(600)
    """)
    with standalone_cloud() as cloud:
        script = script.replace("sys.argv[1]", repr(cloud.endpoint_url))
        with client_process(script, tmp_path) as client:
            assert len(live_instances(cloud, "abandoned")) == 3
            os.killpg(client.pid, signal.SIGKILL)  # laptop lid closed
        # idle_timeout (scheduler VM exits) + death_timeout (workers exit) + margin
        wait_for(
            lambda: not live_instances(cloud, "abandoned"),
            120,
            "every VM of the abandoned cluster to power off",
        )


def test_config_precedence(monkeypatch: pytest.MonkeyPatch) -> None:
    # Packaged default
    assert resolve_options().worker_vm_type == "t3.large"
    # Environment variable, as dask reads it
    monkeypatch.setenv("DASK_RAWVM__LOCAL__WORKER_VM_TYPE", "m6i.large")
    dask.config.refresh()
    try:
        assert resolve_options().worker_vm_type == "m6i.large"
        # A user's profile section, over its provider's section
        profile = {"provider": "aws", "region": "eu-west-1", "worker-vm-type": "g5.xlarge"}
        with dask.config.set({"rawvm.gpu-spot": profile}):
            options = resolve_options("gpu-spot")
            assert (options.provider, options.region) == ("aws", "eu-west-1")
            assert options.worker_vm_type == "g5.xlarge"
            assert options.scheduler_vm_type == "t3.medium"  # from the aws section
            # An explicit keyword wins over everything
            assert resolve_options("gpu-spot", worker_vm_type="c7g.large").worker_vm_type == (
                "c7g.large"
            )
        typo = {"rawvm.typo": {"provider": "aws", "wrker-vm-type": "x"}}
        with dask.config.set(typo), pytest.raises(ValueError, match="wrker-vm-type"):
            resolve_options("typo")
        with pytest.raises(ValueError, match=r"no configuration section 'rawvm\.nope'"):
            resolve_options("nope")
        with pytest.raises(TypeError, match="worker_vm_typo"):
            resolve_options(worker_vm_typo="x")
    finally:
        monkeypatch.delenv("DASK_RAWVM__LOCAL__WORKER_VM_TYPE")
        dask.config.refresh()


def test_user_data_is_the_script_a_worker_boots_with(cloud: LocalCloud) -> None:
    with RawVMCluster(
        n_workers=1, endpoint_url=cloud.endpoint_url, region=cloud.region, scheduler="local"
    ) as cluster:
        script = cluster.user_data()
        assert script.startswith("#!/bin/bash")
        assert "RAWVM_FIRST_INDEX=1" in script  # the next worker's name
        # Its threads and memory: the worker spec's (a t3.large's 2 vCPUs and 8 GiB).
        assert "RAWVM_NTHREADS=2" in script and f"RAWVM_MEMORY_LIMIT={8 * 2**30}" in script
        assert "PRIVATE KEY" not in script and len(script.encode()) < 16 * 1024
        (address,) = cluster.scheduler_info["workers"]  # connected: start waited for it
        logs = cluster.get_logs()
        assert "worker worker-0 of cluster" in logs[address]  # keyed as distributed keys it


async def test_idle_means_no_client_and_no_task(monkeypatch: pytest.MonkeyPatch) -> None:
    from distributed import Client, Scheduler

    # The way the bootstrap runs it: a preload reading the exported timeout.
    monkeypatch.setenv("RAWVM_IDLE_TIMEOUT", "0.3")
    async with Scheduler(
        host="127.0.0.1", dashboard_address=":0", preload=["dask_rawvm.idle_shutdown"]
    ) as scheduler:
        plugin = scheduler.plugins["dask-rawvm-idle-shutdown"]
        async with Client(scheduler.address, asynchronous=True):
            # A connected notebook that is thinking is not idle: many timeouts pass.
            await async_wait_for(lambda: plugin.checks >= 10, 30, "checks while connected")
            assert scheduler.status.name == "running"
        await async_wait_for(
            lambda: scheduler.status.name in ("closing", "closed"),
            30,
            "shutdown once the client left",
        )
