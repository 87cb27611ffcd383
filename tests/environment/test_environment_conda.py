"""conda packages: solved for the target with py-rattler, shipped in the bundle, installed on
the VM. The channel is a local file channel the tests build by hand (``.tar.bz2`` packages
indexed with py-rattler's indexer)."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import rattler.index
from environment_helpers import isolated, needs_pypi, network  # noqa: F401  (isolated: fixture)

from dask_rawvm.environment import PackagePin, Target
from dask_rawvm.environment.conda import (
    CondaEnvironmentError,
    CondaPackage,
    conda_install_script,
    conda_only_pins,
    conda_runtime_exports,
    effective_channels,
    lock_conda,
    read_conda_lock_packages,
    read_prefix_packages,
    virtual_packages,
)
from dask_rawvm.environment.lock import uv_binary

X86 = Target(arch="x86_64")
ARM = Target(arch="aarch64")
HERE = Target.local()
TOOL_X86_BUILD, TOOL_ARM_BUILD = "h1a2b3c4_0", "h5d6e7f8_0"


def conda_package(
    channel: Path,
    name: str,
    version: str,
    build: str,
    subdir: str,
    files: dict[str, tuple[bytes, int]],
    *,
    depends: tuple[str, ...] = (),
    build_number: int = 0,
) -> Path:
    """Write ``<channel>/<subdir>/<name>-<version>-<build>.tar.bz2`` (reproducibly)."""
    index: dict[str, object] = {
        "name": name,
        "version": version,
        "build": build,
        "build_number": build_number,
        "depends": list(depends),
        "subdir": subdir,
        "license": "BSD-3-Clause",
        "timestamp": 1_700_000_000_000,
    }
    if subdir == "noarch":
        index["noarch"] = "generic"
    else:
        index["arch"] = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}[subdir]
        index["platform"] = "linux"
    paths = {
        "paths_version": 1,
        "paths": [
            {
                "_path": path,
                "path_type": "hardlink",
                "sha256": hashlib.sha256(data).hexdigest(),
                "size_in_bytes": len(data),
            }
            for path, (data, _) in sorted(files.items())
        ],
    }
    entries = {
        "info/index.json": (json.dumps(index).encode(), 0o644),
        "info/paths.json": (json.dumps(paths).encode(), 0o644),
        "info/files": ("\n".join(sorted(files)).encode() + b"\n", 0o644),
        **files,
    }
    out = channel / subdir / f"{name}-{version}-{build}.tar.bz2"
    out.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(out, "w:bz2") as tar:
        for path, (data, mode) in sorted(entries.items()):
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), mode, 0
            tar.addfile(info, io.BytesIO(data))
    return out


def tool_script(arch: str) -> tuple[bytes, int]:
    """``bin/rawvmtool``: prints its architecture and the noarch dependency's data."""
    body = f'#!/bin/sh\necho "rawvmtool {arch} $(cat "$(dirname "$0")/../share/rawvm/data.txt")"\n'
    return body.encode(), 0o755


def make_channel(root: Path) -> Path:
    """A channel: ``rawvmtool`` (linux-64: the source's build and a newer one; linux-aarch64:
    one build) needing ``rawvmlib`` (per platform) and ``rawvmdata`` (noarch, with an
    activation script); ``onlyx86`` for linux-64 only."""
    channel = root / "channel"
    for subdir, arch, build in [
        ("linux-64", "x86_64", TOOL_X86_BUILD),
        ("linux-aarch64", "aarch64", TOOL_ARM_BUILD),
    ]:
        files = {"bin/rawvmtool": tool_script(arch)}
        deps = ("rawvmlib >=1", "rawvmdata")
        conda_package(channel, "rawvmtool", "1.2.3", build, subdir, files, depends=deps)
        lib = {"lib/librawvm.txt": (arch.encode(), 0o644)}
        conda_package(channel, "rawvmlib", "1.0", "h0_0", subdir, lib)
    newer = {"bin/rawvmtool": (b"#!/bin/sh\necho newer\n", 0o755)}
    conda_package(channel, "rawvmtool", "1.2.3", "hffffff0_1", "linux-64", newer, build_number=1)
    activate = b'export RAWVM_DATA_DIR="$CONDA_PREFIX/share/rawvm"\n'
    data = {
        "share/rawvm/data.txt": (b"data2\n", 0o644),
        "etc/conda/activate.d/rawvmdata.sh": (activate, 0o644),
    }
    conda_package(channel, "rawvmdata", "2.0", "0", "noarch", data)
    only = {"bin/onlyx86": (b"#!/bin/sh\necho x86\n", 0o755)}
    conda_package(channel, "onlyx86", "0.1", "h0_0", "linux-64", only)
    asyncio.run(rattler.index.index_fs(channel))
    return channel


def tool(channel: Path) -> CondaPackage:
    """``rawvmtool`` as a linux-64 conda environment has it."""
    return CondaPackage("rawvmtool", "1.2.3", TOOL_X86_BUILD, channel.as_uri(), "linux-64")


@pytest.fixture
def channel(tmp_path: Path) -> Path:
    return make_channel(tmp_path)


def test_solve_picks_each_platforms_build(channel: Path, isolated: Path) -> None:  # noqa: F811
    on_x86 = lock_conda([tool(channel)], X86)
    assert on_x86.subdir == "linux-64" and not on_x86.from_cache
    found = {r.name: (r.version, r.build, r.subdir) for r in on_x86.records}
    # The source's platform: its exact build, though the channel has a newer one.
    assert found == {
        "rawvmtool": ("1.2.3", TOOL_X86_BUILD, "linux-64"),
        "rawvmlib": ("1.0", "h0_0", "linux-64"),
        "rawvmdata": ("2.0", "0", "noarch"),
    }
    on_arm = lock_conda([tool(channel)], ARM)
    found = {r.name: (r.version, r.build, r.subdir) for r in on_arm.records}
    # Another platform: the same version, that platform's build; dependencies for it too.
    assert found == {
        "rawvmtool": ("1.2.3", TOOL_ARM_BUILD, "linux-aarch64"),
        "rawvmlib": ("1.0", "h0_0", "linux-aarch64"),
        "rawvmdata": ("2.0", "0", "noarch"),
    }
    record = next(r for r in on_arm.records if r.name == "rawvmtool")
    package_file = channel / "linux-aarch64" / record.file_name
    assert record.local and record.url == package_file.as_uri()
    assert record.sha256 == hashlib.sha256(package_file.read_bytes()).hexdigest()
    assert on_arm.key != on_x86.key
    assert "__glibc=2.34=0" in on_arm.virtual_packages


def test_second_lock_is_read_from_the_cache(channel: Path, isolated: Path) -> None:  # noqa: F811
    first = lock_conda([tool(channel)], ARM)
    second = lock_conda([tool(channel)], ARM)
    assert second.from_cache and not first.from_cache
    assert (second.records, second.key, second.path) == (first.records, first.key, first.path)
    assert second.path.is_relative_to(isolated / "conda")
    assert not lock_conda([tool(channel)], ARM, refresh=True).from_cache
    # A rebuilt local channel is another input: a new solve, which sees the new build.
    conda_package(
        channel,
        "rawvmtool",
        "1.2.3",
        "h5d6e7f8_1",
        "linux-aarch64",
        {"bin/rawvmtool": tool_script("aarch64")},
        depends=("rawvmlib >=1", "rawvmdata"),
        build_number=1,
    )
    asyncio.run(rattler.index.index_fs(channel, force=True))
    third = lock_conda([tool(channel)], ARM)
    assert not third.from_cache and third.key != first.key
    assert {r.name: r.build for r in third.records}["rawvmtool"] == "h5d6e7f8_1"


def test_a_package_missing_for_the_platform_is_a_clear_error(
    channel: Path,
    isolated: Path,  # noqa: F811
) -> None:
    only = CondaPackage("onlyx86", "0.1", "h0_0", channel.as_uri(), "linux-64")
    assert {r.name for r in lock_conda([only, tool(channel)], X86).records} >= {"onlyx86"}
    with pytest.raises(CondaEnvironmentError) as caught:
        lock_conda([only, tool(channel)], ARM)
    message = str(caught.value)
    assert [p.package for p in caught.value.problems] == ["onlyx86"]
    assert "onlyx86 0.1 is not in the channels" in message
    assert "for linux-aarch64, the VMs' platform (they have it for linux-64 only)" in message
    assert "environment_ignore=['onlyx86']" in message and "arm=False" in message
    assert "Nothing was launched" in message
    # The source's build gone from the channel (same platform: the build is pinned).
    gone = CondaPackage("rawvmtool", "1.2.3", "h0000000_0", channel.as_uri(), "linux-64")
    with pytest.raises(CondaEnvironmentError) as caught:
        lock_conda([gone], X86)
    assert "rawvmtool 1.2.3 build h0000000_0 is not in the channels" in str(caught.value)
    assert "for linux-64; builds of 1.2.3 there: h1a2b3c4_0, hffffff0_1" in str(caught.value)


async def test_lock_from_inside_an_event_loop(channel: Path, isolated: Path) -> None:  # noqa: F811
    # The cluster prepares its environment from its async start: the solve runs on a thread.
    lock = lock_conda([tool(channel)], ARM)
    assert {r.name for r in lock.records} == {"rawvmtool", "rawvmlib", "rawvmdata"}
    with pytest.raises(CondaEnvironmentError, match="no conda channel is known for jq"):
        lock_conda([CondaPackage("jq", "1.7.1")], ARM)


def test_write_into_ships_local_packages(channel: Path, tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    lock = lock_conda([tool(channel)], ARM)
    one, two = tmp_path / "bundle1", tmp_path / "bundle2"
    written = lock.write_into(one)
    lock.write_into(two)
    names = [p.relative_to(one).as_posix() for p in written]
    assert names == [
        "conda/install.py",
        "conda/lock.yaml",
        "conda/pkgs/rawvmdata-2.0-0.tar.bz2",
        "conda/pkgs/rawvmlib-1.0-h0_0.tar.bz2",
        f"conda/pkgs/rawvmtool-1.2.3-{TOOL_ARM_BUILD}.tar.bz2",
        "conda/rattler-version",
    ]
    for name in names:  # deterministic: the bundle is content-addressed
        assert (one / name).read_bytes() == (two / name).read_bytes()
    shipped = one / "conda" / "pkgs" / f"rawvmtool-1.2.3-{TOOL_ARM_BUILD}.tar.bz2"
    assert shipped.read_bytes() == (channel / "linux-aarch64" / shipped.name).read_bytes()
    assert (one / "conda" / "rattler-version").read_text().strip() == lock.rattler_version
    # A package file changed after locking is refused, not shipped.
    (channel / "linux-aarch64" / shipped.name).write_bytes(b"changed")
    with pytest.raises(CondaEnvironmentError, match="missing or changed"):
        lock.write_into(tmp_path / "bundle3")


def test_read_prefix_and_conda_lock(tmp_path: Path) -> None:
    meta = tmp_path / "env" / "conda-meta"
    meta.mkdir(parents=True)
    forge = "https://conda.anaconda.org/conda-forge"
    conda_style = {  # conda writes the channel with its subdir
        "name": "ffmpeg",
        "version": "7.1.0",
        "build": "gpl_h1234_100",
        "subdir": "linux-64",
        "channel": f"{forge}/linux-64",
        "url": f"{forge}/linux-64/ffmpeg-7.1.0-gpl_h1234_100.conda",
        "files": ["bin/ffmpeg"],
    }
    rattler_style = {"name": "jq", "version": "1.7.1", "build": "hd590300_0",
                     "subdir": "linux-64", "channel": f"{forge}/"}  # fmt: skip
    (meta / "ffmpeg-7.1.0-gpl_h1234_100.json").write_text(json.dumps(conda_style))
    (meta / "jq-1.7.1-hd590300_0.json").write_text(json.dumps(rattler_style))
    (meta / "history").write_text("")
    found = read_prefix_packages(tmp_path / "env")
    assert found == {
        "ffmpeg": CondaPackage("ffmpeg", "7.1.0", "gpl_h1234_100", forge, "linux-64"),
        "jq": CondaPackage("jq", "1.7.1", "hd590300_0", forge, "linux-64"),
    }
    assert read_prefix_packages(tmp_path) == {}
    lock_file = tmp_path / "conda-lock.yml"
    lock_file.write_text(
        "version: 1\nmetadata: {channels: [{url: conda-forge}]}\npackage:\n"
        + "".join(
            f"- name: jq\n  version: 1.7.1\n  manager: conda\n  platform: {p}\n"
            f"  url: {forge}/{p}/jq-1.7.1-{b}.conda\n  hash: {{sha256: ab}}\n"
            for p, b in [("linux-64", "hd590300_0"), ("linux-aarch64", "h31becfc_0")]
        )
        + "- name: rich\n  version: 13.0.0\n  manager: pip\n  platform: linux-64\n"
        "  url: https://files.pythonhosted.org/rich.whl\n"
    )
    assert read_conda_lock_packages(lock_file) == {
        "jq": CondaPackage("jq", "1.7.1", "hd590300_0", forge, "linux-64")
    }
    arm = read_conda_lock_packages(lock_file, "linux-aarch64")
    assert arm["jq"].build == "h31becfc_0" and arm["jq"].subdir == "linux-aarch64"


def test_channels_virtual_packages_and_pins() -> None:
    ours = CondaPackage("jq", "1.7.1", "h0", "https://example.org/mine", "linux-64")
    assert effective_channels(["conda-forge", "defaults"], [ours]) == [
        "https://conda.anaconda.org/conda-forge",
        "https://repo.anaconda.com/pkgs/main",
        "https://repo.anaconda.com/pkgs/r",
        "https://example.org/mine",
    ]
    cuda = virtual_packages(Target(arch="aarch64", accelerator="cuda", glibc="2.28"))
    assert cuda == (
        "__archspec=1=aarch64",
        "__cuda=12=0",
        "__glibc=2.28=0",
        "__linux=6.1=0",
        "__unix=0=0",
    )
    assert not any(v.startswith("__cuda") for v in virtual_packages(X86))
    assert ours.match_spec("linux-64") == "jq ==1.7.1 h0"
    assert ours.match_spec("linux-aarch64") == "jq ==1.7.1"
    pins = [
        PackagePin("jq", "==1.7.1", "conda", conda_name="jq", python=False),
        PackagePin("ffmpeg", "==7.1", "conda", conda_name="ffmpeg", python=False),
        PackagePin("numpy", "==2.0", "conda", conda_name="numpy"),
        PackagePin("rich", "==13.0"),
    ]
    assert [p.name for p in conda_only_pins(pins, ignore=["ffmpeg"])] == ["jq"]


def vm_environment(tmp_path: Path) -> dict[str, str]:
    """A VM's variables, on this machine: bundle, venv, home; no uv settings of the host."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))},
        "RAWVM_BUNDLE": str(tmp_path / "vm" / "bundle"),
        "RAWVM_VENV": str(tmp_path / "vm" / "venv"),
        "RAWVM_HOME": str(tmp_path / "vm" / "home"),
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        "UV_PYTHON_DOWNLOADS": "never",
    }


def run_bash(script: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    prelude = f'rawvm_uv() {{ "{uv_binary()}" "$@"; }}\n'
    return subprocess.run(
        ["bash", "-c", prelude + script], env=env, capture_output=True, text=True, timeout=timeout
    )


def test_install_script_does_nothing_without_conda_packages(tmp_path: Path) -> None:
    env = vm_environment(tmp_path)
    (tmp_path / "vm" / "bundle").mkdir(parents=True)
    done = run_bash(
        "rawvm_uv() { exit 9; }\n" + conda_install_script() + conda_runtime_exports() + "echo ok",
        env,
        60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok"]


@network
@needs_pypi
def test_vm_script_installs_the_tool(channel: Path, tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    lock = lock_conda([tool(channel)], HERE)
    env = vm_environment(tmp_path)
    lock.write_into(env["RAWVM_BUNDLE"])
    made = subprocess.run(
        [uv_binary(), "venv", "--quiet", "--python", sys.executable, env["RAWVM_VENV"]],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    script = "set -e\n" + conda_install_script() + "echo installed\n"
    started = time.monotonic()
    done = run_bash(script, env, 600)
    first = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("installed")
    arch = "x86_64" if HERE.arch == "x86_64" else "aarch64"
    check = (
        conda_runtime_exports()
        + 'command -v rawvmtool; rawvmtool; echo "$LD_LIBRARY_PATH"; command -v python\n'
        + 'echo "$RAWVM_DATA_DIR"\n'
    )
    ran = run_bash(check, env, 60)
    assert ran.returncode == 0, ran.stderr
    prefix = Path(env["RAWVM_VENV"]) / "conda"
    lines = ran.stdout.splitlines()
    assert lines[0] == str(prefix / "bin" / "rawvmtool")
    assert lines[1] == f"rawvmtool {arch} data2"
    assert lines[2].split(":")[0] == str(prefix / "lib")
    assert lines[3] == str(Path(env["RAWVM_VENV"]) / "bin" / "python")  # the venv's, first
    assert lines[4] == str(prefix / "share" / "rawvm")  # the package's activation script ran
    assert (prefix / "lib" / "librawvm.txt").read_text() == arch
    # Again (another Dask process of the host, a reboot): the tool venv and prefix are reused.
    started = time.monotonic()
    again = run_bash(script, env, 120)
    second = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    print(f"VM-side conda install: first {first:.1f} s, again {second:.1f} s")


@network
@needs_pypi
def test_a_conda_only_package_runs_on_the_workers(
    channel: Path, tmp_path: Path, cloud, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A conda-lock.yml whose C-tool-like package comes from a local file channel: the
    workers run it (py-rattler on the VM installs it from the bundle)."""
    import dask
    import distributed

    from dask_rawvm import RawVMCluster

    tool_file = channel / "linux-64" / f"rawvmtool-1.2.3-{TOOL_X86_BUILD}.tar.bz2"
    pip = "".join(
        f"- name: {name}\n  version: {version}\n  manager: pip\n  platform: linux-64\n"
        f"  url: https://files.pythonhosted.org/{name}.whl\n"
        for name, version in [("dask", dask.__version__), ("distributed", distributed.__version__)]
    )
    lock_file = tmp_path / "conda-lock.yml"
    lock_file.write_text(
        f"version: 1\nmetadata: {{channels: [{{url: '{channel.as_uri()}'}}]}}\npackage:\n"
        f"- name: rawvmtool\n  version: 1.2.3\n  manager: conda\n  platform: linux-64\n"
        f"  url: {tool_file.as_uri()}\n  hash: {{sha256: ab}}\n"
        f"  dependencies: {{rawvmlib: '>=1', rawvmdata: ''}}\n" + pip
    )
    monkeypatch.chdir(tmp_path)
    with RawVMCluster(
        n_workers=1,
        endpoint_url=cloud.endpoint_url,
        region=cloud.region,
        scheduler="local",
        worker_vm_type="t3.large" if HERE.arch == "x86_64" else "t4g.large",
        environment=str(lock_file),
        environment_check="warn",  # the list of pip packages is not this process's
    ) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(1, timeout=300)
        out = client.run(subprocess.check_output, ["rawvmtool"])
        assert set(out.values()) == {f"rawvmtool {HERE.arch} data2\n".encode()}
