"""The control path at a thousand workers: scale up, connect, adapt idle to zero.

    python benchmarks/scale.py [--sizes 200 1000] [--hosts 2] [--profile DIR]

A dense local cloud (``dask-rawvm localcloud --dense``, in a process of its own, so that its
CPU is not the client's): the scheduler VM boots as a process of its own, as usual; every
worker VM is a ``distributed.Worker`` in one of a few host processes, listening on its VM's
own address, named by the cluster's name map and closed when its instance is terminated
(``dask_rawvm.localcloud.dense``). What is measured is the cluster manager in this process
and the one scheduler: launches, names, connections, adapt, retirement, termination.

For each N, one line per figure, then the ratios of the largest N to the smallest:

- seconds from ``cluster.scale(N)`` to N workers connected (the scheduler's view), and the
  EC2 calls made meanwhile (target at N = 1000: at most ceil(N/1000) + 3);
- seconds from ``cluster.adapt(minimum=0)`` with N idle workers to zero workers and every
  worker VM terminated, and the TerminateInstances calls (target: 2);
- this process's CPU seconds per worker, scaling up and adapting down (target: flat,
  within 1.5x from the smallest N to the largest); idle to zero within 1.5x likewise.

``--profile DIR`` records this process with py-spy (every thread, collapsed stacks) for each
phase and N.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3

from dask_rawvm import RawVMCluster
from dask_rawvm.localcloud import CREDENTIALS, RemoteCloud
from dask_rawvm.providers.base import ROLE_TAG
from dask_rawvm.providers.ec2.account import live_instances_sync


def dense_cloud(hosts: int) -> contextlib.AbstractContextManager[RemoteCloud]:
    """``dask-rawvm localcloud --dense`` in a process group of its own."""
    return RemoteCloud.standalone("--dense", "--dense-hosts", str(hosts), "--unsized")


def ec2_calls(cloud: RemoteCloud) -> dict[str, int]:
    return {action: n for action, n in cloud.calls.items() if ":" not in action}


def wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    began = time.perf_counter()
    while not condition():
        if time.perf_counter() - began > timeout:
            raise TimeoutError(f"{what}: not within {timeout} s")
        time.sleep(0.1)
    return time.perf_counter() - began


def connected(cluster: RawVMCluster) -> int:
    return len(cluster.scheduler_info.get("workers", {}))


class GCTime:
    """Seconds this process spent in the cyclic garbage collector, and full collections."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.full = 0
        self._began = 0.0

    def __enter__(self) -> GCTime:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        else:
            self.seconds += time.perf_counter() - self._began
            self.full += info["generation"] == 2


@contextlib.contextmanager
def profiled(directory: Path | None, name: str) -> Iterator[None]:
    """py-spy over every thread of this process (the cluster's event loop runs in its own),
    active samples only, as collapsed stacks and a flame graph."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    spy = subprocess.Popen(
        [shutil.which("py-spy") or os.path.join(os.path.dirname(sys.executable), "py-spy"),
         "record", "--pid", str(os.getpid()), "--rate", "100", "--native", "--format", "raw",
         "--output", str(directory / f"{name}.txt")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    time.sleep(1)  # attached
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.wait(timeout=60)


def measure(cloud: RemoteCloud, n: int, profile: Path | None) -> dict[str, Any]:
    with RawVMCluster(
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        progress=False,
        silence_logs=logging.ERROR,
        # A VM takes seconds to boot; a thousand of them on one scheduler take longer to
        # connect than a laptop's idle-timeout tolerance: none of it must time out here.
        death_timeout=600,
    ) as cluster:
        with profiled(profile, f"scale-{n}"), GCTime() as up_collector:
            cloud.reset_calls()
            cpu, began = time.process_time(), time.perf_counter()
            cluster.scale(n)
            wait(lambda: connected(cluster) >= n, 1800, f"{n} workers connecting")
            up = time.perf_counter() - began
            up_cpu = time.process_time() - cpu
            up_calls = ec2_calls(cloud)
        with profiled(profile, f"adapt-{n}"), GCTime() as collector:
            cloud.reset_calls()
            cpu, began = time.process_time(), time.perf_counter()
            cluster.adapt(minimum=0, maximum=n)
            # When adapt decided (the spec emptied), the scheduler saw no worker, the
            # cluster had closed every worker (terminated): where the time goes.
            phases: dict[str, float] = {}

            def done() -> bool:
                now = time.perf_counter() - began
                if not cluster.worker_spec:
                    phases.setdefault("decided", now)
                if connected(cluster) == 0:
                    phases.setdefault("disconnected", now)
                if not cluster.workers:
                    phases.setdefault("closed", now)
                return len(phases) == 3

            wait(done, 1800, f"{n} idle workers adapting to zero")
            down = time.perf_counter() - began
            down_cpu = time.process_time() - cpu
            down_calls = ec2_calls(cloud)
        # Every worker VM terminated, as the cloud says (after the measurement: a call).
        ec2 = boto3.client("ec2", **cloud.client_kwargs())
        live = [
            i
            for i in live_instances_sync(ec2, cluster.cluster_name)
            if {"Key": ROLE_TAG, "Value": "worker"} in i.get("Tags", [])
        ]
    return {
        "up": up,
        "up_calls": up_calls,
        "up_cpu": up_cpu / n,
        "down": down,
        "down_calls": down_calls,
        "down_cpu": down_cpu / n,
        "live": len(live),
        "phases": phases,
        "up_gc": up_collector.seconds,
        "gc": collector.seconds,
        "gc_full": collector.full,
    }


def line(label: str, value: str, note: str = "") -> None:
    print(f"{label:<58} {value:>12}  {note}".rstrip(), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--hosts", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--profile", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    results = {}
    for n in args.sizes:
        # A cloud per size: moto slows down as instances accumulate.
        with dense_cloud(args.hosts) as cloud:
            results[n] = result = measure(cloud, n, args.profile)
        limit = math.ceil(n / 1000) + 3
        up_calls = sum(result["up_calls"].values())
        terminations = result["down_calls"].get("TerminateInstances", 0)
        line(f"N={n}: scale(N) to N workers connected", f"{result['up']:.1f} s")
        by_action = ", ".join(f"{a} {c}" for a, c in sorted(result["up_calls"].items()))
        line(f"N={n}: EC2 calls to scale up", f"{up_calls}", f"target <= {limit}: {by_action}")
        line(f"N={n}: client GC during scale up", f"{result['up_gc']:.2f} s")
        line(f"N={n}: adapt, N idle workers to 0", f"{result['down']:.1f} s")
        phases = ", ".join(f"{k} {v:.1f} s" for k, v in result["phases"].items())
        line(f"N={n}: adapt to 0, its phases (from adapt())", "", phases)
        line(
            f"N={n}: client GC during adapt to 0",
            f"{result['gc']:.2f} s",
            f"{result['gc_full']} full collections",
        )
        line(f"N={n}: TerminateInstances calls to reach 0", f"{terminations}", "target <= 2")
        line(f"N={n}: worker VMs left running after adapt to 0", f"{result['live']}")
        line(f"N={n}: client CPU per worker, scale up", f"{result['up_cpu'] * 1000:.2f} ms")
        line(f"N={n}: client CPU per worker, adapt to 0", f"{result['down_cpu'] * 1000:.2f} ms")
    if len(results) > 1:
        small, large = min(results), max(results)
        a, b = results[small], results[large]
        line(
            f"N={large} / N={small}: idle -> 0 time",
            f"{b['down'] / a['down']:.2f} x",
            "target <= 1.5",
        )
        line(
            f"N={large} / N={small}: client CPU per worker, scale up",
            f"{b['up_cpu'] / a['up_cpu']:.2f} x",
            "target <= 1.5",
        )
        line(
            f"N={large} / N={small}: client CPU per worker, adapt to 0",
            f"{b['down_cpu'] / a['down_cpu']:.2f} x",
            "target <= 1.5",
        )


if __name__ == "__main__":
    main()
