"""The README's first command, ``dask-rawvm demo``, as a user runs it: a cluster on the local
cloud boots, computes, adapts up under load and down when idle with its data intact, and
leaves no instance running. Its tasks run on VMs whose environment leaves out the client's
own tools (boto3, moto), so nothing it sends may need them."""

from __future__ import annotations

import os

from helpers import run_cli


def test_the_readme_demo_succeeds_and_leaves_nothing_running() -> None:
    ran = run_cli("demo", env={**os.environ}, timeout=600)
    assert ran.returncode == 0, ran.stdout + ran.stderr[-3000:]
    lines = ran.stdout.splitlines()
    assert "persisted data after scale-down: intact" in lines
    assert lines[-2].endswith("instances left running: 0") and lines[-1] == "demo succeeded"
