"""The user's environment on the VMs, end to end: local code edited here runs there."""

from __future__ import annotations

import gzip
import os
import re
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import boto3
import dask
import pytest
from environment_helpers import pure
from helpers import live_instances, wait_for
from uv import find_uv_bin

from dask_rawvm import EnvironmentMismatch, RawVMCluster
from dask_rawvm.environment import EnvironmentTranslationError
from dask_rawvm.localcloud import LocalCloud


def written_files(root: Path, since: float, digest: str) -> list[Path]:
    """Every file written since ``since`` (a timestamp) in what was made under ``root``
    since then, each once, but for other environments' than ``digest``'s.

    On the local cloud ``root`` (``RAWVM_HOME``) is this machine's store of every VM
    environment ever built (gigabytes): what this cluster's VM made is what is new in it,
    less what VMs of other clusters (another test process's) make there meanwhile, named
    ``<kind>-<their digest>`` (an artifact they pack vanishes as it is read).
    Symbolic links are not followed (a venv's ``lib64 -> lib``, its ``python``).
    """
    found = []
    for made in (p for p in root.iterdir() if modified_since(p, since)):
        other = re.fullmatch(r"[a-z]+-([0-9a-f]{64})(\.tar\.gz)?", made.name)
        if other and other.group(1) != digest:
            continue
        for directory, _, names in os.walk(made) if made.is_dir() else [(root, [], [made.name])]:
            for name in names:
                path = Path(directory, name)
                if not path.is_symlink() and path.is_file() and modified_since(path, since):
                    found.append(path)
    return found


def modified_since(path: Path, since: float) -> bool:
    """Whether ``path`` was modified since ``since``; a file gone meanwhile was not (the
    builder's staging copy of its venv, removed once the artifact is uploaded)."""
    try:
        return path.stat().st_mtime >= since
    except FileNotFoundError:
        return False


def holds(path: Path, secret: bytes) -> bool:
    """Whether the file at ``path`` holds ``secret``; a file gone since it was listed (the
    builder's staging copy) holds nothing at rest any more."""
    try:
        return secret in path.read_bytes()
    except FileNotFoundError:
        return False


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
    # toolz 1.0.0 is not this process's (which dask imported): the fidelity check would stop
    # the start; this test is about the lock cache, so it only warns.
    options = {
        "endpoint_url": cloud.endpoint_url,
        "region": cloud.region,
        "environment_check": "warn",
    }
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


def test_the_clients_dask_config_reaches_every_vm(cloud: LocalCloud) -> None:
    options = {"endpoint_url": cloud.endpoint_url, "region": cloud.region}
    settings = {"my-key": 1, "distributed.scheduler.allowed-failures": 7}
    with dask.config.set(settings), RawVMCluster(n_workers=2, **options) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=180)
        assert set(client.run(dask.config.get, "my-key").values()) == {1}
        assert client.run_on_scheduler(dask.config.get, "my-key") == 1
        assert (
            client.run_on_scheduler(dask.config.get, "distributed.scheduler.allowed-failures") == 7
        )
        # Set later, here: a worker launched after it gets it too (its launch's config).
        with dask.config.set({"my-key": 2}):
            cluster.scale(3)
            client.wait_for_workers(3, timeout=180)
        assert sorted(client.run(dask.config.get, "my-key").values()) == [1, 1, 2]
        assert "my-key" not in cluster.user_data()  # in the store, not in user-data


def test_the_fidelity_check_compares_the_vms_with_this_process(cloud: LocalCloud) -> None:
    options = {"endpoint_url": cloud.endpoint_url, "region": cloud.region}
    with RawVMCluster(n_workers=1, **options) as cluster:
        check = cluster.environment_check
        assert not check.reports["scheduler"].differences
        # start waited for the worker, and for its check
        assert not check.reports["worker"].differences  # moto (the local cloud's) is not one

    # An environment whose toolz is not this process's (dask imported it): the start stops,
    # naming it, and nothing is left behind.
    with pytest.raises(EnvironmentMismatch) as error:
        RawVMCluster(environment=["toolz==1.0.0", "dask", "distributed"], **options)
    assert "toolz: 1.2.0 here, 1.0.0 on the scheduler VM" in str(error.value)
    assert "environment_check='warn'" in str(error.value)
    wait_for(lambda: not live_instances(cloud), 60, "the refused cluster's VMs terminated")

    # The same on a worker (the scheduler here, in this process, is this environment).
    with pytest.raises(EnvironmentMismatch) as error:
        RawVMCluster(
            n_workers=1,
            scheduler="local",
            environment=["toolz==1.0.0", "dask", "distributed"],
            **options,
        )
    assert "toolz: 1.2.0 here, 1.0.0 on worker worker-0" in str(error.value)
    wait_for(lambda: not live_instances(cloud), 60, "the refused cluster's VMs terminated")


def test_index_credentials_reach_the_install_step_only(
    cloud: LocalCloud, served: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote, url = served
    pure(remote, "rawvm-private-pkg", "1.0")
    token_url = url.replace("http://", "http://me:t0ken-s3cret@")
    monkeypatch.chdir(tmp_path)
    began = time.time() - 1  # file times are not finer than that everywhere
    with RawVMCluster(
        n_workers=1,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        environment=["rawvm-private-pkg==1.0", "dask", "distributed", f"--find-links {token_url}"],
        environment_check="off",
    ) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(1, timeout=180)
        assert client.submit(lambda: __import__("rawvm_private_pkg").VERSION).result() == "1.0"
        assert "t0ken-s3cret" not in cluster.user_data()
        machine = next(iter(cluster.instances.values()))
        assert "t0ken-s3cret" not in cloud.console_output(machine)
        # Nothing the VM wrote holds it: the bundle, the lock, the venv, the config.
        home = Path(client.run(lambda: __import__("os").environ["RAWVM_HOME"]).popitem()[1])
        venv = Path(client.run(lambda: __import__("sys").prefix).popitem()[1])  # venv-<digest>
        written = written_files(home, began, venv.name.removeprefix("venv-"))
        assert any(p.name == "INSTALLER" for p in written), "the install is not among them"
        assert [p for p in written if holds(p, b"t0ken-s3cret")] == []
    bucket_objects = boto3.client("s3", **cloud.client_kwargs())
    buckets = [b["Name"] for b in bucket_objects.list_buckets()["Buckets"]]
    # the cluster's store went with it; the account's environment artifacts stay, for the next
    stores = [b for b in buckets if b.startswith("dask-rawvm-env-")]
    assert [b for b in buckets if b not in stores] == []
    # nor does the artifact the VM built (the venv, packed) where every later VM gets it
    for bucket in stores:
        for item in bucket_objects.list_objects_v2(Bucket=bucket).get("Contents", []):
            body = bucket_objects.get_object(Bucket=bucket, Key=item["Key"])["Body"].read()
            unpacked = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
            assert b"t0ken-s3cret" not in unpacked, item["Key"]
