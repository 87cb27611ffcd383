"""Shared fixtures: a local cloud per test, credentials for endpoint clients, and
a check that every VM process a test started is gone when it ends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

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
