"""The dense local cloud: worker VMs as Dask workers in a few host processes, driven by a
real cluster through the EC2 API: the control path at 200 workers (24 s here; the figures
at N = 200 and 1000 are benchmarks/scale.py's)."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from helpers import live_instances, wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.environment.bootstrap import scheduler_script, worker_script
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.localcloud.dense import WORKER_VARIABLE, script_variables
from dask_rawvm.providers.base import ROLE_TAG

N = 200


@pytest.fixture
def dense_cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCloud]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with LocalCloud(dense=True, dense_hosts=2, sized=False) as cloud:
        yield cloud
        assert cloud.runtime is not None and cloud.runtime.dense is not None
        hosts = [host.process for host in cloud.runtime.dense.hosts]
    # Closing the cloud ended its host processes (and with them every worker).
    assert all(process.poll() is not None for process in hosts)


def test_a_worker_boot_scripts_variables_are_read_and_others_are_not_a_workers() -> None:
    script = worker_script("c", "tls://10.0.0.1:8786", "worker-", 3, 60, nthreads=2)
    variables = script_variables(script)
    assert variables[WORKER_VARIABLE] == "tls://10.0.0.1:8786"
    assert variables["RAWVM_CLUSTER"] == "c" and variables["RAWVM_NTHREADS"] == "2"
    assert WORKER_VARIABLE not in script_variables(scheduler_script("c", None))
    assert script_variables("#!/bin/bash\necho hello\n") == {}
    # Only the leading block: an assignment further down is the script's own.
    assert script_variables("#!/bin/bash\nA='1 2'\n\necho\nB=3\n") == {"A": "1 2"}


def test_a_dense_cluster_scales_up_names_its_workers_and_adapts_to_zero(
    dense_cloud: LocalCloud,
) -> None:
    with RawVMCluster(
        endpoint_url=dense_cloud.endpoint_url,
        region=dense_cloud.region,
        progress=False,
        silence_logs=logging.ERROR,
        death_timeout=120,
    ) as cluster:
        client = cluster.get_client()
        dense_cloud.reset_calls()
        cluster.scale(N)
        # Not client.wait_for_workers: through the cluster it checks booting VMs for death
        # every 3 s (a DescribeInstances each), calls of the wait, not of the scale-up.
        wait_for(lambda: len(client.scheduler_info()["workers"]) == N, 240, f"{N} workers")
        names = {w["name"] for w in client.scheduler_info()["workers"].values()}
        assert names == set(cluster.workers)  # name == spec key, from the name map
        # Each worker listens on its own VM's address.
        hosts = {w["host"] for w in client.scheduler_info()["workers"].values()}
        assert len(hosts) == N
        up_calls = {a: n for a, n in dense_cloud.calls.items() if ":" not in a}
        assert sum(up_calls.values()) <= 4, up_calls

        dense_cloud.reset_calls()
        cluster.adapt(minimum=0, maximum=N, interval="200ms", wait_count=1)
        wait_for(
            lambda: not client.scheduler_info()["workers"] and not cluster.workers,
            240,
            "adapt to zero",
        )
        assert dense_cloud.calls["TerminateInstances"] <= 2, dense_cloud.calls
        workers = [
            i
            for i in live_instances(dense_cloud, cluster.cluster_name)
            if {"Key": ROLE_TAG, "Value": "worker"} in i.get("Tags", [])
        ]
        assert workers == []
