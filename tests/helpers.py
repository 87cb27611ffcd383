"""Helpers for tests: what the cloud reports, and waiting on conditions with a deadline."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3

from dask_rawvm.localcloud import CREDENTIALS, LocalCloud, RemoteCloud
from dask_rawvm.providers.ec2 import EC2Provider
from dask_rawvm.providers.ec2.account import live_instances_sync


def live_instances(cloud: LocalCloud | RemoteCloud, cluster: str | None = None) -> list[dict]:
    """Instances that are not terminated, as DescribeInstances reports them."""
    return live_instances_sync(boto3.client("ec2", **cloud.client_kwargs()), cluster)


def wait_for(condition: Callable[[], object], timeout: float = 60, what: str = "") -> None:
    """Poll ``condition`` until true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        time.sleep(0.1)


async def async_wait_for(
    condition: Callable[[], object], timeout: float = 60, what: str = ""
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what or condition}")
        await asyncio.sleep(0.1)


def pypi_reachable() -> bool:
    try:
        socket.create_connection(("pypi.org", 443), timeout=3).close()
        return True
    except OSError:
        return False


def standalone_cloud() -> contextlib.AbstractContextManager[RemoteCloud]:
    """``dask-rawvm localcloud`` in its own process (it outlives a killed client)."""
    return RemoteCloud.standalone(stop_timeout=30)


@contextmanager
def client_process(script: str, workdir: Path) -> Iterator[subprocess.Popen[str]]:
    """A Python client in its own process group; killed at the end if still running.

    The script prints "ready" once its cluster is up; the caller kills it.
    """
    errors = workdir / "client.err"
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    with open(errors, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-c", script],
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=env,
            cwd=workdir,
            start_new_session=True,
        )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().strip() == "ready", errors.read_text()[-3000:]
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def asking_options(cloud: LocalCloud | RemoteCloud, **kwargs: object) -> dict[str, object]:
    """Options of clusters that are about what they ask for, not what runs: the scheduler in
    this process, no environment to build, start returns once it asked."""
    return {
        "endpoint_url": cloud.endpoint_url,
        "region": cloud.region,
        "scheduler": "local",
        "environment": None,
        "wait_for_workers": False,
        **kwargs,
    }


def run_cli(
    *args: str, env: dict[str, str], timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """``dask-rawvm *args`` as a user runs it: a process of its own, output captured."""
    return subprocess.run(
        [sys.executable, "-m", "dask_rawvm.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


async def started_ec2_provider(cloud: LocalCloud, prefix: str, **kwargs: Any) -> EC2Provider:
    """An EC2 provider of a new cluster (``<prefix>-<random>``) on ``cloud``, started; it asks
    no capacity again unless told (``capacity_retry_timeout``)."""
    kwargs.setdefault("capacity_retry_timeout", 0.0)
    provider = EC2Provider(
        f"{prefix}-{uuid.uuid4().hex[:6]}",
        cloud.region,
        cloud.endpoint_url,
        dict(CREDENTIALS),
        **kwargs,
    )
    await provider.start()
    return provider
