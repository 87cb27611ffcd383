"""The boot path a real EC2 VM takes, on the local cloud's bare image: a system Python and curl,
no uv, no pip, nothing cached, a filesystem view of its own. The VMs install the environment
from the package index (marked ``network``)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import cloudpickle
import dask.array as da
import pytest
from environment_helpers import needs_pypi, network
from helpers import wait_for

from dask_rawvm import RawVMCluster
from dask_rawvm.environment.lock import uv_binary
from dask_rawvm.errors import OptionError
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


@network
@needs_pypi
def test_a_default_cluster_boots_computes_and_adapts_on_the_bare_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
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
    with RawVMCluster(n_workers=2, local_image="bare", death_timeout=60) as cluster:
        assert cluster.provider.cloud is not None
        assert cluster.provider.cloud.image.name == "bare"
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
        logs = cluster.get_logs()
        boot = "\n".join(str(log) for log in logs.values())
        assert "Python 3.11" in boot or f"Python {sys.version_info[0]}" in boot
        assert sys.prefix not in boot and uv_binary() not in boot

        cluster.adapt(minimum=1, maximum=2)
        wait_for(lambda: len(client.scheduler_info()["workers"]) == 1, 120, "adapt down to 1")
        assert int(x.sum().compute()) == 499999500000  # the data moved, not lost
    start = time.monotonic()
    assert cluster.status.name == "closed" and time.monotonic() - start < 5


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
