"""Helpers for tests: what the cloud reports, and waiting on conditions with a deadline."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import boto3

from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.providers.base import CLUSTER_TAG, LIVE_STATES


def live_instances(cloud: LocalCloud, cluster: str | None = None) -> list[dict]:
    """Instances that are not terminated, as DescribeInstances reports them."""
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    filters = [{"Name": "instance-state-name", "Values": list(LIVE_STATES)}]
    if cluster is not None:
        filters.append({"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]})
    pages = ec2.get_paginator("describe_instances").paginate(Filters=filters)
    return [i for p in pages for r in p["Reservations"] for i in r["Instances"]]


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
