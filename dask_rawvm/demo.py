"""``dask-rawvm demo``: the whole life of a cluster on the embedded local cloud.

Starts a local cloud, then a RawVMCluster against its endpoint (as a user of a
remote EC2-compatible endpoint would), computes, adapts up under load and back
down when idle with its persisted data intact, closes, and checks through the
EC2 API that no instance of the cluster is left.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import boto3
from distributed import Client

from dask_rawvm.cluster import RawVMCluster
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.providers.ec2.account import live_instances_sync


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _load(client: Client, maximum: int) -> int:
    """Keep the cluster busy until adapt reached ``maximum`` or the work is done; the peak.

    Each task is ``time.sleep(1)`` itself: a function of this module would make every
    worker import it, and with it the client's tools (boto3, the local cloud), which the
    VMs' environment leaves out.
    """
    futures = client.map(time.sleep, [1.0] * (maximum * 6), pure=False)
    peak = 0

    def busy() -> bool:
        nonlocal peak
        peak = max(peak, len(client.scheduler_info()["workers"]))
        return peak < maximum and not all(f.done() for f in futures)

    _wait(lambda: not busy(), 120)
    client.gather(futures)
    return peak


def live_instances(cloud: LocalCloud, cluster: str) -> list[str]:
    """Ids of the cluster's instances that are not terminated, from DescribeInstances."""
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    return [i["InstanceId"] for i in live_instances_sync(ec2, cluster)]


def run_demo(workers: int, maximum: int, scheduler: str, echo: Callable[[str], None]) -> int:
    """Run the demo; return 0 when every step did what it should."""
    import dask.array as da

    ok = True
    with LocalCloud() as cloud:
        os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
        echo(f"local cloud at {cloud.endpoint_url}")
        start = time.monotonic()
        with RawVMCluster(
            n_workers=workers,
            endpoint_url=cloud.endpoint_url,
            region=cloud.region,
            scheduler=scheduler,
            death_timeout=30,
        ) as cluster:
            name = cluster.cluster_name
            echo(
                f"cluster {name} up in {time.monotonic() - start:.1f} s; "
                f"dashboard {cluster.dashboard_link}"
            )
            client = cluster.get_client()
            client.wait_for_workers(workers, timeout=120)
            echo(f"{workers} worker VMs connected after {time.monotonic() - start:.1f} s")

            x = da.random.random((4000, 4000), chunks=1000).persist()
            mean = float(x.mean().compute())
            total = sum(client.gather(client.map(lambda i: i * i, range(100))))
            echo(f"computed: mean of a 4000x4000 array = {mean:.4f}; sum of squares = {total}")

            cluster.adapt(minimum=1, maximum=maximum)
            before = cloud.calls
            peak = _load(client, maximum)
            echo(f"adapt scaled up to {peak} workers under load")
            idle = time.monotonic()
            down = _wait(lambda: len(client.scheduler_info()["workers"]) == 1, 120)
            echo(f"adapt scaled down to 1 worker {time.monotonic() - idle:.1f} s after going idle")
            calls = cloud.calls - before
            echo(
                f"EC2 calls while adapting: CreateFleet={calls['CreateFleet']} "
                f"TerminateInstances={calls['TerminateInstances']}"
            )
            kept = abs(float(x.mean().compute()) - mean) < 1e-12
            echo(f"persisted data after scale-down: {'intact' if kept else 'LOST'}")
            ok &= down and kept and peak > 1
        closed = time.monotonic()
        left = live_instances(cloud, name)
        echo(f"closed in {time.monotonic() - closed:.1f} s; instances left running: {len(left)}")
        ok &= not left
    echo("demo " + ("succeeded" if ok else "FAILED"))
    return 0 if ok else 1
