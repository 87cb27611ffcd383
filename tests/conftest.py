"""Shared fixtures: a local cloud per test, credentials for endpoint clients, a check
that every VM process a test started is gone when it ends, and two SSH hosts."""

from __future__ import annotations

from collections.abc import Iterator

import dask.config
import pytest
from sshd import Lab, make_lab, sshd_available

from dask_rawvm.localcloud import CREDENTIALS, LocalCloud


@pytest.fixture
def cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCloud]:
    """A local cloud, and AWS credentials in the environment for clusters that use it."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with LocalCloud() as cloud:
        yield cloud
        processes = [vm.process for vm in cloud.runtime.vms.values() if vm.process]  # type: ignore[union-attr]
    # LocalCloud.close() halted every VM: none of their processes may survive it.
    assert all(p.poll() is not None for p in processes), "a VM process outlived its cloud"


@pytest.fixture
def quiet_cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCloud]:
    """A cloud whose VMs never boot during a test: for what a cluster asks for, not runs.
    A cluster's start does not wait for workers there (they would never connect)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    no_wait = {f"rawvm.{section}.wait-for-workers": False for section in ("local", "aws")}
    with dask.config.set(no_wait), LocalCloud(boot_delay=3600) as cloud:
        yield cloud


@pytest.fixture
def broken_image_cloud(tmp_path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCloud]:
    """A cloud whose machine image has a broken curl: every VM powers off at boot."""
    broken = tmp_path / "curl"
    broken.write_text("#!/bin/sh\necho 'curl: broken image' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with LocalCloud(image_path=[str(tmp_path)]) as cloud:
        yield cloud


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """Two SSH hosts (real sshd on loopback addresses) and a key and known_hosts for both."""
    if not sshd_available():
        pytest.skip("needs OpenSSH's sshd: run ci/install-system-deps.sh")
    lab = make_lab(tmp_path_factory.mktemp("ssh-lab"))
    try:
        yield lab
    finally:
        for server in lab.servers:
            server.stop()
