"""The local cloud's machine images: a bare VM has what a fresh Amazon Linux 2023 VM has."""

from __future__ import annotations

import os
import platform
import shlex
import site
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest
from helpers import wait_for

from dask_rawvm.localcloud import IMAGES, LocalCloud, RemoteCloud
from dask_rawvm.localcloud.runtime import HOST_NETWORK_VARIABLES

TOOLS = "curl bash tar gzip awk sed grep flock setsid sha256sum base64 mktemp"


@pytest.fixture
def bare_cloud() -> Iterator[LocalCloud]:
    with LocalCloud(image="bare") as cloud:
        yield cloud
        processes = [vm.process for vm in cloud.runtime.vms.values() if vm.process]  # type: ignore[union-attr]
    assert all(p.poll() is not None for p in processes), "a VM process outlived its cloud"


def boot(cloud: LocalCloud, script: str, instance_type: str = "t3.micro") -> str:
    """Boot one VM running ``script``; returns its console once it printed "done"."""
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    (instance,) = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType=instance_type,
        UserData=script,
    )["Instances"]
    instance_id = instance["InstanceId"]
    try:
        wait_for(lambda: "done" in cloud.console_output(instance_id), 60, "the boot script")
    except AssertionError:
        raise AssertionError(cloud.console_output(instance_id)) from None
    return cloud.console_output(instance_id)


def report(output: str) -> dict[str, str]:
    """The ``key=value`` lines of a console."""
    return dict(line.split("=", 1) for line in output.splitlines() if "=" in line)


def _first_entry(directory: str) -> str:
    return os.path.join(directory, sorted(os.listdir(directory))[0])


def _client_home_entry() -> str | None:
    """Something in the client's home that is not on the way to the base interpreter."""
    home = os.path.realpath(os.path.expanduser("~"))
    base = os.path.realpath(sys.base_prefix)
    for name in sorted(os.listdir(home)):
        path = os.path.join(home, name)
        if not (base + "/").startswith(path + "/"):
            return path
    return None


def test_a_bare_vm_has_python3_and_the_tools_but_no_python_tooling(bare_cloud: LocalCloud) -> None:
    script = f"""#!/bin/bash
echo "tools=$(command -v {TOOLS} | wc -l)"
echo "tooling=$(command -v uv uvx pip pip3 python conda | tr '\\n' ' ')"
echo "python=$(python3 -c 'import platform, sys; print(platform.python_version(), sys.prefix)')"
echo "importable=$(python3 -c 'import distributed' 2>/dev/null && echo distributed)"
echo "pip_module=$(python3 -m pip --version >/dev/null 2>&1 && echo runs || echo fails)"
echo "home=$HOME"
echo "rawvm_home=$RAWVM_HOME"
echo "uv_cache=${{UV_CACHE_DIR:-unset}}"
{" ".join(f'echo "{v}=${{{v}:-unset}}";' for v in HOST_NETWORK_VARIABLES)}
echo done
"""
    seen = report(boot(bare_cloud, script))
    assert seen["tools"] == str(len(TOOLS.split()))
    assert seen["tooling"].strip() == ""
    version, prefix = seen["python"].split()
    assert version == platform.python_version() == bare_cloud.image.python_version
    assert prefix != sys.prefix  # not the client's virtualenv
    assert seen["importable"] == "" and seen["pip_module"] == "fails"
    vm_directories = bare_cloud.workdir / "vms"
    assert Path(seen["home"]).parent.parent == vm_directories
    assert Path(seen["rawvm_home"]).parent.parent == vm_directories
    assert seen["uv_cache"] == "unset"  # uv's default: $HOME/.cache/uv, empty
    for variable in HOST_NETWORK_VARIABLES:  # the trust store and the proxies pass through
        assert seen[variable] == os.environ.get(variable, "unset")


def test_a_bare_vm_has_a_view_of_its_own(bare_cloud: LocalCloud) -> None:
    if not bare_cloud.image.isolation.own_view:
        pytest.skip(f"no view of its own here: {bare_cloud.image.isolation.notes}")
    client_cwd = os.getcwd()
    home_entry = _client_home_entry()
    checks = {
        "cwd": _first_entry(client_cwd),
        "client_venv": sys.executable,
        "client_home": home_entry or "/nonexistent",
        "base_site_packages": _first_entry(site.getsitepackages([sys.base_prefix])[0]),
        "base_interpreter": os.path.realpath(sys._base_executable),  # type: ignore[attr-defined]
    }
    lines = [f'[ -e {shlex.quote(p)} ] && echo "{k}=visible" || echo "{k}=hidden"'
             for k, p in checks.items()]  # fmt: skip
    boot(bare_cloud, "#!/bin/bash\necho secret > $HOME/secret\necho done\n")
    (secret,) = Path(bare_cloud.workdir, "vms").glob("*/home/secret")  # another VM's file
    script = "\n".join(
        [
            "#!/bin/bash",
            f"echo cwd_entries=$(ls -A {shlex.quote(client_cwd)} | wc -l)",
            *lines,
            f"[ -e {secret} ] && echo other_vm=visible || echo other_vm=hidden",
            "echo tmp=$(ls -A /tmp | wc -l)",
            "echo usr_bin_pip=$( [ -x /usr/bin/pip ] && echo runs || echo masked)",
            "echo usr_bin_python3=$(/usr/bin/python3 -c 'import sys; print(sys.prefix)')",
            "echo stdlib=$(python3 -c 'import json, ssl, sqlite3; print(\"ok\")')",
            "echo done",
        ]
    )
    seen = report(boot(bare_cloud, script))
    assert seen["cwd"] == "hidden" and seen["cwd_entries"] == "0"
    assert seen["client_venv"] == "hidden"
    if home_entry is not None:
        assert seen["client_home"] == "hidden"
    assert seen["base_site_packages"] == "hidden"
    assert seen["base_interpreter"] == "visible" and seen["stdlib"] == "ok"
    assert seen["other_vm"] == "hidden"
    assert seen["tmp"] == "1"  # its own /tmp: only the way to its own directory
    assert seen["usr_bin_pip"] == "masked"
    if Path("/usr/bin/python3").exists():
        assert seen["usr_bin_python3"] == str(bare_cloud.runtime.machine_image.root)  # type: ignore[union-attr]


def test_without_mount_namespaces_a_bare_vm_is_kept_apart_by_path_and_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # As on a machine without root: the fallback says what it is, and still has no tooling.
    from dask_rawvm.localcloud import runtime

    monkeypatch.setattr(runtime, "own_view_unavailable", lambda: "not root")
    with LocalCloud(image="bare") as cloud:
        isolation = cloud.image.isolation
        assert not isolation.own_view and not isolation.sized
        assert any("PATH and environment only" in note for note in isolation.notes)
        seen = report(
            boot(
                cloud,
                "#!/bin/bash\n"
                "echo tooling=$(command -v uv pip pip3 | wc -l)\n"
                "echo tmpdir=$TMPDIR\n"
                "echo pip_module=$(python3 -m pip --version >/dev/null 2>&1 && echo runs)\n"
                "echo done\n",
            )
        )
        assert seen["tooling"] == "0" and seen["pip_module"] == ""
        assert Path(seen["tmpdir"]).parent.parent == cloud.workdir / "vms"


def test_the_image_path_hook_comes_first_on_both_images(tmp_path: Path) -> None:
    broken = tmp_path / "curl"
    broken.write_text("#!/bin/sh\necho 'curl: broken image' >&2\nexit 1\n")
    broken.chmod(0o755)
    for image in IMAGES:
        with LocalCloud(image=image, image_path=[str(tmp_path)]) as cloud:
            seen = report(boot(cloud, "#!/bin/bash\necho curl=$(command -v curl)\necho done\n"))
            assert seen["curl"] == str(broken), image


def test_the_warm_image_is_this_machines_environment(cloud: LocalCloud) -> None:
    assert cloud.image.name == "warm" and cloud.image.has_uv
    assert not cloud.image.isolation.own_view
    seen = report(
        boot(
            cloud,
            "#!/bin/bash\n"
            "echo python=$(command -v python)\n"
            "echo uv_cache=$UV_CACHE_DIR\n"
            "echo done\n",
        )
    )
    assert Path(seen["python"]).parent == Path(sys.executable).parent
    assert seen["uv_cache"] not in ("", "unset")


def test_the_image_is_known_before_launch_and_by_remote_clients() -> None:
    cloud = LocalCloud(image="bare")  # not started: nothing is made
    assert cloud.image.name == "bare" and not cloud.image.has_uv
    assert cloud.image.python_version == platform.python_version()
    with pytest.raises(ValueError, match=r"'warm'.*'bare'"):
        LocalCloud(image="ubuntu")  # type: ignore[arg-type]

    server = subprocess.Popen(
        [sys.executable, "-m", "dask_rawvm.cli", "localcloud", "--image", "bare", "--unsized"],
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert server.stdout is not None
        remote = RemoteCloud(server.stdout.readline().split("endpoint: ")[1].strip())
        assert remote.image.name == "bare" and not remote.image.isolation.sized
        assert remote.image.python_version == platform.python_version()
    finally:
        os.killpg(server.pid, 15)
        assert server.wait(timeout=30) == 0


def test_the_shared_bare_image_is_rebuilt_if_a_vm_changed_it(tmp_path: Path) -> None:
    # A VM without a view of its own can write to it (python3 -m ensurepip, say).
    from dask_rawvm.localcloud.vmimage import bare_root

    root = bare_root(tmp_path)
    assert bare_root(tmp_path) == root  # built once, then shared
    (site_packages,) = root.glob("lib/python3*/site-packages")
    (site_packages / "pip").mkdir()
    (root / "bin" / "pip3").symlink_to("/bin/true")
    assert bare_root(tmp_path) == root
    assert not (site_packages / "pip").exists() and not (root / "bin" / "pip3").exists()
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # nothing left aside
