"""The user's environment on the VMs, end to end: local code edited here runs there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import live_instances
from uv import find_uv_bin

from dask_rawvm import RawVMCluster
from dask_rawvm.environment import EnvironmentTranslationError
from dask_rawvm.localcloud import LocalCloud


def read_on_a_worker(cluster: RawVMCluster, module: str) -> str:
    client = cluster.get_client()
    client.wait_for_workers(1, timeout=120)
    # A lambda travels by value; the module it imports must be on the VM.
    return str(client.submit(lambda: __import__(module).VALUE, pure=False).result(timeout=60))


@pytest.fixture
def editable_package(tmp_path: Path):
    """A package installed in editable mode into this environment, removed afterwards."""
    source = tmp_path / "rawvm_probe_pkg"
    (source / "rawvm_probe_pkg").mkdir(parents=True)
    (source / "pyproject.toml").write_text(
        textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=64"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "rawvm-probe-pkg"
        version = "0.1"
        """)
    )
    module = source / "rawvm_probe_pkg" / "__init__.py"
    module.write_text('VALUE = "editable v1"\n')
    uv = find_uv_bin()
    install = [uv, "pip", "install", "--python", sys.executable, "-e", str(source)]
    subprocess.run(install, check=True, capture_output=True)
    try:
        yield module
    finally:
        uninstall = [uv, "pip", "uninstall", "--python", sys.executable, "rawvm-probe-pkg"]
        subprocess.run(uninstall, check=True, capture_output=True)


def test_local_code_edited_here_runs_on_new_workers(
    cloud: LocalCloud, editable_package: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    notebook_dir = tmp_path / "notebook"
    notebook_dir.mkdir()
    (notebook_dir / "rawvm_probe_loose.py").write_text('VALUE = "loose v1"\n')
    monkeypatch.chdir(notebook_dir)  # a loose module next to the notebook
    options = {"endpoint_url": cloud.endpoint_url, "region": cloud.region, "scheduler": "local"}

    with RawVMCluster(n_workers=1, **options) as cluster:
        assert read_on_a_worker(cluster, "rawvm_probe_pkg") == "editable v1"
        assert read_on_a_worker(cluster, "rawvm_probe_loose") == "loose v1"

    editable_package.write_text('VALUE = "editable v2"\n')
    (notebook_dir / "rawvm_probe_loose.py").write_text('VALUE = "loose v2"\n')
    with RawVMCluster(n_workers=1, **options) as cluster:
        assert read_on_a_worker(cluster, "rawvm_probe_pkg") == "editable v2"
        assert read_on_a_worker(cluster, "rawvm_probe_loose") == "loose v2"
        # Only local code changed: the lock came from the cache, no resolver ran.
        assert cluster.store.bundles["worker"].lock.from_cache
    assert live_instances(cloud) == []


def test_second_start_with_an_unchanged_environment_runs_no_resolver(cloud: LocalCloud) -> None:
    options = {"endpoint_url": cloud.endpoint_url, "region": cloud.region}
    requirements = ["toolz==1.0.0", "dask", "distributed"]
    with RawVMCluster(environment=requirements, **options) as first:
        first_digest = first.store.bundles["worker"].digest
    with RawVMCluster(environment=requirements, **options) as second:
        bundle = second.store.bundles["worker"]
        assert bundle.lock.from_cache
        assert bundle.digest == first_digest
    assert live_instances(cloud) == []


def test_untranslatable_environment_fails_before_anything_launches(cloud: LocalCloud) -> None:
    with pytest.raises(EnvironmentTranslationError) as error:
        RawVMCluster(
            n_workers=2,
            endpoint_url=cloud.endpoint_url,
            region=cloud.region,
            environment=["cupy-cuda12x==13.3.0", "dask", "distributed"],
        )
    message = str(error.value)
    assert "cupy-cuda12x" in message and "no CPU build" in message
    assert "environment_ignore=['cupy-cuda12x']" in message
    assert cloud.calls["CreateFleet"] == 0
    assert live_instances(cloud) == []
    # Whatever preflight stored is gone too.
    import boto3

    assert boto3.client("s3", **cloud.client_kwargs()).list_buckets()["Buckets"] == []


def test_pip_tools_cannot_lock_for_another_platform(cloud: LocalCloud) -> None:
    # pip-compile silently resolves for this machine: asked for an aarch64 VM, it must refuse.
    with pytest.raises(Exception, match="pip-tools") as error:
        RawVMCluster(
            n_workers=1,
            endpoint_url=cloud.endpoint_url,
            region=cloud.region,
            worker_vm_type="m7g.large",
            scheduler="local",
            environment=["toolz==1.0.0", "dask", "distributed"],
            environment_resolver="pip-tools",
        )
    assert "aarch64" in str(error.value)
    assert cloud.calls["CreateFleet"] == 0
    assert live_instances(cloud) == []
