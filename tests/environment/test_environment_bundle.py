"""Bundles: local wheels, content addressing, wrong-arch errors, and the VM install script."""

from __future__ import annotations

import os
import subprocess
import tarfile
import zipfile
from pathlib import Path

import pytest
from environment_helpers import (  # noqa: F401  (isolated is a fixture)
    ARM,
    X86,
    isolated,
    local_index_lines,
    make_index,
    project,
)

from dask_rawvm.environment import (
    EnvironmentBundleError,
    LocalCode,
    Target,
    build_bundle,
    build_local_wheel,
    install_script,
    lock_environment,
    resolve_environment_spec,
    translate_environment,
    wheel_fits_target,
)
from dask_rawvm.environment.bundle import modules_wheel
from dask_rawvm.environment.lock import uv_binary

HERE = Target.local()


def modules_dir(root: Path) -> Path:
    code = root / "code"
    (code / "mypkg").mkdir(parents=True)
    (code / "mypkg" / "__init__.py").write_text("from mypkg.core import ANSWER\n")
    (code / "mypkg" / "core.py").write_text("ANSWER = 42\n")
    (code / "helpers_mod.py").write_text("def double(x):\n    return 2 * x\n")
    return code


def test_wheel_fits_target() -> None:
    cpu_arm, cpu_x86 = Target(arch="aarch64"), Target(arch="x86_64")
    assert wheel_fits_target("a-1.0-py3-none-any.whl", cpu_arm)
    assert wheel_fits_target(f"a-1.0-{X86}.whl", cpu_x86)
    assert not wheel_fits_target(f"a-1.0-{X86}.whl", cpu_arm)
    assert wheel_fits_target(f"a-1.0-{ARM}.whl", cpu_arm)
    assert wheel_fits_target("a-1.0-cp39-abi3-manylinux2014_x86_64.whl", cpu_x86)
    assert not wheel_fits_target("a-1.0-cp312-cp312-manylinux_2_28_x86_64.whl", cpu_x86)
    assert not wheel_fits_target("a-1.0-cp311-cp311-manylinux_2_39_x86_64.whl", cpu_x86)
    assert wheel_fits_target("a-1.0-cp311-cp311-linux_x86_64.whl", cpu_x86)


def test_modules_wheel_is_reproducible(tmp_path: Path) -> None:
    code = modules_dir(tmp_path)
    local = LocalCode("rawvm-local-code", str(code), "modules", ("helpers_mod.py", "mypkg"))
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first = modules_wheel(local, tmp_path / "a")
    second = modules_wheel(local, tmp_path / "b")
    assert first.name == second.name and first.read_bytes() == second.read_bytes()
    assert first.name.endswith("-py3-none-any.whl")
    names = zipfile.ZipFile(first).namelist()
    assert {"helpers_mod.py", "mypkg/__init__.py", "mypkg/core.py"} <= set(names)
    assert any(n.endswith(".dist-info/RECORD") for n in names)


def test_pure_local_project_fits_any_arch(tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    proj = project(tmp_path / "src", "purelocal")
    code = LocalCode("purelocal", str(proj), "project", editable=True)
    (tmp_path / "out").mkdir()
    wheel = build_local_wheel(code, Target(arch="aarch64"), tmp_path / "out")
    assert wheel.name == "purelocal-1.0-py3-none-any.whl"


def test_compiled_local_project_for_another_arch_is_an_error(
    tmp_path: Path,
    isolated: Path,  # noqa: F811
) -> None:
    arch = HERE.arch
    other = "aarch64" if arch == "x86_64" else "x86_64"
    proj = project(tmp_path / "src", "nativelib", tag=f"cp311-cp311-linux_{arch}")
    code = LocalCode("nativelib", str(proj), "project", editable=True)
    (tmp_path / "out").mkdir()
    assert build_local_wheel(code, Target(arch=arch), tmp_path / "out").is_file()  # type: ignore[arg-type]
    with pytest.raises(EnvironmentBundleError) as info:
        build_local_wheel(code, Target(arch=other), tmp_path / "out")  # type: ignore[arg-type]
    message = str(info.value)
    assert "nativelib" in message and f"linux_{arch}" in message
    assert "environment_ignore=['nativelib']" in message


def bundle_for(root: Path, index: Path, cache: Path, code: Path, target: Target):
    spec = resolve_environment_spec([*local_index_lines(index), "app==1.0", "helper==1.0"])
    local = LocalCode("rawvm-local-code", str(code), "modules", ("helpers_mod.py", "mypkg"))
    translation = translate_environment(spec, target, extra=[local])
    lock = lock_environment(translation, cache_dir=cache)
    return build_bundle(lock, cache_dir=cache)


def test_bundle_digest_is_stable(tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    index = make_index(tmp_path)
    code = modules_dir(tmp_path)
    one = bundle_for(tmp_path, index, tmp_path / "c1", code, ARM_TARGET)
    two = bundle_for(tmp_path, index, tmp_path / "c2", code, ARM_TARGET)
    assert one.digest == two.digest and one.path != two.path
    assert one.path.name == one.digest
    assert [w.name for w in one.wheels] == [w.name for w in two.wheels]
    archive_one = one.write_archive(tmp_path / "one.tar.gz")
    archive_two = two.write_archive(tmp_path / "two.tar.gz")
    assert archive_one.read_bytes() == archive_two.read_bytes()
    with tarfile.open(archive_one) as tar:
        names = tar.getnames()
    assert {"manifest.json", "requirements.txt", "python-version"} <= set(names)
    manifest = one.manifest
    assert manifest["target"] == ARM_TARGET.as_dict() and manifest["python_version"] == "3.11"
    # Any change in content is a new digest.
    (code / "helpers_mod.py").write_text("def double(x):\n    return x + x\n")
    assert bundle_for(tmp_path, index, tmp_path / "c1", code, ARM_TARGET).digest != one.digest
    assert bundle_for(tmp_path, index, tmp_path / "c1", code, HERE).digest != one.digest


ARM_TARGET = Target(arch="aarch64")


def test_install_script_installs_the_bundle(tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    index = make_index(tmp_path)
    code = modules_dir(tmp_path)
    bundle = bundle_for(tmp_path, index, tmp_path / "cache", code, HERE)
    archive = bundle.write_archive(tmp_path)
    extracted = tmp_path / "vm" / "bundle"
    extracted.mkdir(parents=True)
    with tarfile.open(archive) as tar:
        tar.extractall(extracted, filter="data")
    venv = tmp_path / "vm" / "venv"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UV_", "VIRTUAL_ENV"))},
        "PATH": f"{Path(uv_binary()).parent}:{os.environ['PATH']}",
        "RAWVM_BUNDLE": str(extracted),
        "RAWVM_VENV": str(venv),
        "UV_CACHE_DIR": str(tmp_path / "uv-cache"),
        "UV_PYTHON_DOWNLOADS": "never",
    }
    script = "set -e\necho before\n" + install_script() + "echo after $RAWVM_VENV\n"
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["before", "after", str(venv)]
    check = (
        "import app, fastlib, helper, mypkg, helpers_mod;"
        "print(app.VERSION, fastlib.TAG, helper.VERSION, mypkg.ANSWER, helpers_mod.double(2))"
    )
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-c", check], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1.0", X86 if HERE.arch == "x86_64" else ARM, "1.0", "42", "4"]


def test_install_script_fails_loudly_without_bundle(tmp_path: Path) -> None:
    env = {"PATH": os.environ["PATH"], "RAWVM_VENV": str(tmp_path / "venv")}
    done = subprocess.run(
        ["bash", "-c", install_script()], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0 and "RAWVM_BUNDLE" in done.stderr
