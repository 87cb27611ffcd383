"""`dask-rawvm ls` and `down`: clusters found and removed by their tags, client or not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import boto3
from helpers import client_process, live_instances, standalone_cloud


def cli(*args: str, endpoint: str) -> str:
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y"}
    command = [
        sys.executable,
        "-m",
        "dask_rawvm.cli",
        *args,
        "--endpoint-url",
        endpoint,
        "--region",
        "us-east-1",
    ]
    return subprocess.run(command, env=env, capture_output=True, text=True, check=True).stdout


def test_down_all_after_a_killed_client_leaves_no_tagged_resource(tmp_path) -> None:
    script = textwrap.dedent("""
        from dask_rawvm import RawVMCluster
        cluster = RawVMCluster(n_workers=2, endpoint_url=ENDPOINT, region="us-east-1",
                               name="orphan")
        print("ready", flush=True)
        import time
        time.sleep(600)
    """)
    with standalone_cloud() as cloud:
        with client_process(script.replace("ENDPOINT", repr(cloud.endpoint_url)), tmp_path) as c:
            os.killpg(c.pid, signal.SIGKILL)
        assert len(live_instances(cloud, "orphan")) == 3  # nothing cleaned up after a SIGKILL
        listing = cli("ls", endpoint=cloud.endpoint_url)
        assert "orphan: 1 buckets, 3 instances" in listing
        assert "environment artifacts (bucket dask-rawvm-env-" in listing  # the account's

        removed = cli("down", "--all", endpoint=cloud.endpoint_url)
        assert "orphan: removed 1 buckets, 3 instances" in removed
        assert "environment artifacts: removed bucket dask-rawvm-env-" in removed
        assert live_instances(cloud, "orphan") == []
        s3 = boto3.client("s3", **cloud.client_kwargs())
        assert s3.list_buckets()["Buckets"] == []
        assert "no dask-rawvm resources" in cli("ls", endpoint=cloud.endpoint_url)
