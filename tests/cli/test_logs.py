"""``dask-rawvm logs``: a running VM's log from its console, a terminated VM's from what it
shipped to the cluster's bucket when it powered off; ``get_logs()["Cluster"]`` holds what
dask-rawvm logged about the cluster."""

from __future__ import annotations

import os
import subprocess
import sys

import boto3
from botocore.config import Config
from helpers import live_instances, wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud


def logs(cloud: LocalCloud, *args: str) -> str:
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": cloud.endpoint_url,
        "AWS_DEFAULT_REGION": cloud.region,
        "AWS_ACCESS_KEY_ID": CREDENTIALS["aws_access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["aws_secret_access_key"],
    }
    done = subprocess.run(
        [sys.executable, "-m", "dask_rawvm.cli", "logs", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def shipped_keys(cloud: LocalCloud) -> set[str]:
    s3 = boto3.client("s3", config=Config(s3={"addressing_style": "path"}), **cloud.client_kwargs())
    keys = set()
    for bucket in s3.list_buckets()["Buckets"]:
        listing = s3.list_objects_v2(Bucket=bucket["Name"], Prefix="logs/")
        keys |= {o["Key"] for o in listing.get("Contents", [])}
    return keys


def test_logs_of_running_and_terminated_vms(cloud: LocalCloud) -> None:
    with RawVMCluster(
        n_workers=2,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        name="logged",
    ) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=120)
        running = logs(cloud, "logged")
        for name in ("worker-0", "worker-1"):
            machine = cluster.ledger.machine_of(name)
            assert machine is not None
            assert f"===== {name} ({machine.id}, running; from its console) =====" in running
            assert f"worker {name} of cluster logged on {machine.id}" in running

        cluster.scale(1)  # retires one worker: its VM powers off and ships its log
        wait_for(lambda: len(cluster.workers) == 1, 60, "one worker left")
        (gone,) = {"worker-0", "worker-1"} - set(cluster.workers)
        machine = cluster.ledger.machine_of(gone)
        assert machine is not None
        wait_for(lambda: f"logs/{machine.id}.log" in shipped_keys(cloud), 60, "its log shipped")
        wait_for(
            lambda: machine.id not in {i["InstanceId"] for i in live_instances(cloud)},
            60,
            "its VM terminated",
        )
        one = logs(cloud, "logged", gone)
        assert one.count("=====") == 2  # one machine's header, nothing else
        assert f"===== {gone} ({machine.id}," in one
        assert f"worker {gone} of cluster logged" in one
        assert "End worker" in one  # the end of its life (the Dask process's goodbye)
        assert one.rstrip().endswith("shipping the log")

        own = cluster.get_logs()["Cluster"]
        assert "dask_rawvm.machines.launcher - INFO - launched 2 of 2 worker VM(s)" in own, own
