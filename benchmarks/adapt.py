"""Adaptive scale-down benchmark: from idle to every worker VM terminated.

For N workers (holding persisted data), the cluster goes idle and ``adapt(minimum=0)``
takes over; measured: seconds until every worker instance is terminated (asked of
the EC2 API), the TerminateInstances calls it took, and whether the persisted data
survived until the last worker left. Side by side, in the same run: LocalCluster's
adaptive scale-down of N local worker processes to zero.

    python benchmarks/adapt.py [--sizes 4 50]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import dask.array as da
from distributed import Client, LocalCluster

from dask_rawvm import RawVMCluster
from dask_rawvm.demo import live_instances
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud


def wait(condition: Callable[[], bool], timeout: float) -> float:
    began = time.perf_counter()
    while not condition():
        if time.perf_counter() - began > timeout:
            raise TimeoutError("condition not reached")
        time.sleep(0.05)
    return time.perf_counter() - began


def rawvm_idle_to_terminated(cloud: LocalCloud, n: int) -> tuple[float, int, bool]:
    with RawVMCluster(
        endpoint_url=cloud.endpoint_url, region=cloud.region, scheduler="local",
        worker_nthreads=1, worker_memory_limit="1GiB",
    ) as cluster:
        client = cluster.get_client()
        cluster.scale(n)
        client.wait_for_workers(n, timeout=600)
        data = client.persist(da.ones((n * 100, 1000), chunks=(100, 1000)))
        expected = float(data.sum().compute())
        before = cloud.calls["TerminateInstances"]
        name = cluster.cluster_name
        # Data held, no task running: idle. Adapt down to one, check the data, then to zero.
        cluster.adapt(minimum=1, maximum=n)
        elapsed = wait(lambda: len(live_instances(cloud, name)) == 1, 600)
        kept = float(data.sum().compute()) == expected
        del data
        cluster.adapt(minimum=0, maximum=n)
        elapsed += wait(lambda: not live_instances(cloud, name), 600)
        calls = cloud.calls["TerminateInstances"] - before
    return elapsed, calls, kept


def local_idle_to_zero(n: int) -> float:
    with LocalCluster(n_workers=n, threads_per_worker=1, memory_limit="1GiB",
                      dashboard_address=":0") as cluster, Client(cluster) as client:
        client.wait_for_workers(n)
        cluster.adapt(minimum=0, maximum=n)
        return wait(lambda: not client.scheduler_info()["workers"], 600)


def main(sizes: list[int]) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with LocalCloud() as cloud:
        for n in sizes:
            ours, calls, kept = rawvm_idle_to_terminated(cloud, n)
            local = local_idle_to_zero(n)
            print(
                f"adapt N={n}: dask_rawvm idle -> all {n} worker VMs terminated in {ours:.1f} s "
                f"({calls} TerminateInstances call(s), persisted data "
                f"{'kept' if kept else 'LOST'} through scale-down); "
                f"LocalCluster idle -> 0 workers in {local:.1f} s"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 50])
    main(parser.parse_args().sizes)
