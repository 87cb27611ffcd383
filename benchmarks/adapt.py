"""Adaptive scale-down benchmark: from idle to every worker VM terminated.

For N workers holding persisted data, the cluster goes idle and adapt takes over:
first down to one worker (the data must survive: it moves), then to zero. Measured:
seconds until every worker instance is terminated (asked of the EC2 API) and the
TerminateInstances calls it took. Side by side, in the same run and the same
scenario: LocalCluster's adaptive scale-down of N local worker processes.

Then, side by side, results lost when an idle cluster holding W workers' worth of
scattered (not recomputable) data adapts down to one worker: dask_rawvm's
RawVMCluster, and dask-cloudprovider's EC2Cluster on the same local cloud, run from a
virtualenv of its own with an emulated Docker image (``benchmarks/cloudprovider.py``
says what is emulated; ``--no-cloudprovider`` skips this part).

    python benchmarks/adapt.py [--sizes 4 50] [--workers 4] [--futures 40] [--no-cloudprovider]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import dask.array as da
from cloudprovider import adapt_text, cloudprovider_adapt_row, futures_lost_after_adapt
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


def idle_to_zero(
    cluster: object, client: Client, n: int, live: Callable[[], int]
) -> tuple[float, bool]:
    """The same scenario for both clusters: N workers, persisted data, then idle.

    Adapt first down to one worker (the data must survive), then to zero; the time
    is until ``live()`` (worker VMs, or worker processes) reaches zero.
    """
    client.wait_for_workers(n, timeout=600)
    data = client.persist(da.ones((n * 100, 1000), chunks=(100, 1000)))
    expected = float(data.sum().compute())
    cluster.adapt(minimum=1, maximum=n)  # type: ignore[attr-defined]
    elapsed = wait(lambda: live() == 1, 600)
    kept = float(data.sum().compute()) == expected
    del data
    cluster.adapt(minimum=0, maximum=n)  # type: ignore[attr-defined]
    return elapsed + wait(lambda: live() == 0, 600), kept


def rawvm(cloud: LocalCloud, n: int) -> tuple[float, bool, int]:
    with RawVMCluster(
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        worker_nthreads=1,
        worker_memory_limit="1GiB",
    ) as cluster:
        client = cluster.get_client()
        cluster.scale(n)
        before = cloud.calls["TerminateInstances"]
        elapsed, kept = idle_to_zero(
            cluster, client, n, lambda: len(live_instances(cloud, cluster.cluster_name))
        )
        return elapsed, kept, cloud.calls["TerminateInstances"] - before


def local(n: int) -> tuple[float, bool]:
    with (
        LocalCluster(
            n_workers=n, threads_per_worker=1, memory_limit="1GiB", dashboard_address=":0"
        ) as cluster,
        Client(cluster) as client,
    ):
        return idle_to_zero(cluster, client, n, lambda: len(client.scheduler_info()["workers"]))


# -- futures lost on adaptive scale-down: dask_rawvm next to dask-cloudprovider's EC2Cluster --
def rawvm_futures_lost(workers: int, futures: int) -> str:
    """The lifecycle scenario of ``benchmarks/cloudprovider.py``, for RawVMCluster."""
    with (
        LocalCloud() as cloud,
        RawVMCluster(
            endpoint_url=cloud.endpoint_url,
            region=cloud.region,
            scheduler="local",
            worker_nthreads=1,
            worker_memory_limit="1GiB",
        ) as cluster,
    ):
        client = cluster.get_client()
        cluster.scale(workers)
        before = cloud.calls["TerminateInstances"]
        result = futures_lost_after_adapt(cluster, client, workers, futures)
        result["terminate_calls"] = cloud.calls["TerminateInstances"] - before
    return f"adapt W={workers}: dask_rawvm RawVMCluster: futures lost = {adapt_text(result)}"


def lifecycle(workers: int, futures: int) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    print(rawvm_futures_lost(workers, futures), flush=True)
    print(cloudprovider_adapt_row(workers, futures), flush=True)


def main(sizes: list[int]) -> None:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with LocalCloud() as cloud:
        for n in sizes:
            ours, kept, calls = rawvm(cloud, n)
            theirs, their_kept = local(n)
            print(
                f"adapt N={n}: dask_rawvm idle -> all {n} worker VMs terminated in {ours:.1f} s "
                f"({calls} TerminateInstances call(s), data {'kept' if kept else 'LOST'}); "
                f"LocalCluster, same scenario -> 0 workers in {theirs:.1f} s "
                f"(data {'kept' if their_kept else 'LOST'})"
            )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[4, 50])
    parser.add_argument("--workers", type=int, default=4, help="W, for the futures-lost lines")
    parser.add_argument("--futures", type=int, default=40)
    parser.add_argument("--no-cloudprovider", action="store_true", help="skip those lines")
    args = parser.parse_args()
    main(args.sizes)
    if not args.no_cloudprovider:
        lifecycle(args.workers, args.futures)
