"""The boot path a real EC2 VM takes, on the local cloud's bare image: a system Python and curl,
no uv, no pip, nothing cached, a filesystem view of its own. One VM installs the environment
from the package index (marked ``network``) and publishes it as an artifact in the account's
store; every other VM, of this cluster and of the next, unpacks that instead."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import cloudpickle
import dask.array as da
import pytest
from environment_helpers import needs_pypi, network
from helpers import wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.environment.lock import uv_binary
from dask_rawvm.errors import OptionError
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.machines.preflight import check_vm_python
from dask_rawvm.providers.base import ImagePythons
from dask_rawvm.providers.ec2.provider import AL2023_PYTHONS


def what_a_vm_sees(client_paths: list[str]) -> dict[str, object]:
    """Run on a worker: its interpreter, caches and tools, and which client paths it sees."""
    import os
    import shutil
    import sys

    return {
        "executable": sys.executable,
        "prefix": sys.prefix,
        "uv": os.environ.get("RAWVM_UV", ""),
        "uv_cache": os.environ.get("UV_CACHE_DIR", ""),
        "home": os.environ.get("HOME", ""),
        "rawvm_home": os.environ.get("RAWVM_HOME", ""),
        "pip": shutil.which("pip") or shutil.which("pip3") or "",
        # A directory hidden by the VM's view is an empty mount point: nothing of it shows.
        "visible": [
            p for p in client_paths if os.path.isfile(p) or (os.path.isdir(p) and os.listdir(p))
        ],
    }


BUILT = "published the environment's artifact"
UNPACKED = "environment unpacked from its artifact"
INSTALLED = "building the environment's artifact"


def boot_logs(cluster: RawVMCluster) -> list[str]:
    """Each VM's boot log (the scheduler VM's and every worker's)."""
    return [str(log) for log in cluster.get_logs(cluster=False).values()]


@pytest.fixture
def bare_cloud(monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalCloud]:
    """A local cloud of the bare image, outliving a cluster (its artifact store too)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", CREDENTIALS["aws_access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", CREDENTIALS["aws_secret_access_key"])
    with LocalCloud(image="bare") as cloud:
        yield cloud


@network
@needs_pypi
def test_a_cluster_on_the_bare_image_installs_once_computes_adapts_and_the_next_reuses_it(
    bare_cloud: LocalCloud,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notebook_helper.py").write_text("VALUE = 7\n")
    # This module is not on the VMs: its functions travel by value.
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    # A file in the client's home (the image's Python lives under it here, so the home itself
    # is a mount point in the VM's view, holding only what is bound back).
    marker = Path.home() / f".rawvm-bare-test-{os.getpid()}"
    marker.write_text("the client's\n")
    request.addfinalizer(lambda: marker.unlink(missing_ok=True))
    client_paths = [sys.prefix, str(tmp_path), str(marker), uv_binary()]
    on_cloud = {"endpoint_url": bare_cloud.endpoint_url, "region": bare_cloud.region}
    with RawVMCluster(n_workers=2, death_timeout=60, **on_cloud) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(2, timeout=600)
        x = da.arange(1_000_000, chunks=100_000).persist()
        assert int(x.sum().compute()) == 499999500000
        assert set(client.run(lambda: __import__("notebook_helper").VALUE).values()) == {7}

        for seen in client.run(what_a_vm_sees, client_paths).values():
            # The VM's own venv, made from the image's Python, with uv fetched from the store:
            # nothing of the client's venv, uv, uv cache or environment directory.
            assert seen["visible"] == [], seen
            assert not str(seen["prefix"]).startswith(sys.prefix)
            assert str(seen["prefix"]).startswith(str(seen["rawvm_home"]))
            assert str(seen["uv"]).startswith(str(seen["rawvm_home"]) + "/tools/uv-")
            assert seen["uv_cache"] == "" and seen["pip"] == ""
        logs = boot_logs(cluster)
        boot = "\n".join(logs)
        assert "Python 3.11" in boot or f"Python {sys.version_info[0]}" in boot
        assert sys.prefix not in boot and uv_binary() not in boot
        # Three VMs (the scheduler's and two workers): one built the environment from the
        # index and published it, the other two unpacked it.
        wait_for(lambda: BUILT in "".join(boot_logs(cluster)), 120, "the artifact published")
        assert sum(INSTALLED in log for log in logs) == 1, boot
        assert sum(UNPACKED in log for log in logs) == 2, boot
        assert "from the package index instead" not in boot, boot

        cluster.adapt(minimum=1, maximum=2)
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, 120, "adapt down to 1")
        assert int(x.sum().compute()) == 499999500000  # the data moved, not lost
    assert cluster.status.name == "closed"

    # The next cluster of the same environment in the same account: nothing from the index.
    with RawVMCluster(n_workers=1, death_timeout=60, **on_cloud) as again:
        again.get_client().wait_for_workers(1, timeout=300)
        logs = boot_logs(again)
        assert len(logs) == 2 and all(UNPACKED in log for log in logs), logs
        assert not any(INSTALLED in log or "another VM builds" in log for log in logs), logs


def test_a_vm_python_of_another_minor_is_refused_before_launch() -> None:
    # An image with only 3.9 whose VMs cannot download a Python (the local cloud's reach
    # package registries only): refused, naming both versions and the fix.
    bare = ImagePythons(("3.9.18",), False, "the local cloud's bare image", "local_image='warm'")
    with pytest.raises(OptionError, match=r"need Python 3\.11.*has Python 3\.9\.18") as error:
        check_vm_python("3.11.7", bare)
    assert "local_image='warm'" in str(error.value)
    # The same minor, another patch: the image's (distributed only warns on a patch).
    check_vm_python("3.11.7", ImagePythons(("3.11.2",), False, "an image"))
    # Amazon Linux 2023: 3.9 and dnf's python3.11..3.14; else uv's managed Python, downloaded.
    check_vm_python("3.11.7", ImagePythons(AL2023_PYTHONS, True, "AL2023"))
    check_vm_python("3.10.14", ImagePythons(AL2023_PYTHONS, True, "AL2023"))
