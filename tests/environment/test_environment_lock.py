"""Locking against a local index (and, marked ``network``, PyPI): cross-arch, cache, errors."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest
from environment_helpers import ARM as ARM_TAG
from environment_helpers import (  # noqa: F401  (isolated is a fixture)
    isolated,
    local_index_lines,
    make_index,
    needs_pypi,
    network,
    project,
)

from dask_rawvm.environment import (
    EnvironmentLockError,
    Target,
    lock_environment,
    resolve_environment_spec,
    translate_environment,
    write_wheel,
)
from dask_rawvm.environment.lockfiles import parse_requirements_file

ARM = Target(arch="aarch64")
X86 = Target(arch="x86_64")


@pytest.fixture
def index(tmp_path: Path, isolated: Path) -> Path:  # noqa: F811
    return make_index(tmp_path)


def lock_for(index: Path, target: Target, *requirements: str, ignore: tuple[str, ...] = ()):
    spec = resolve_environment_spec([*local_index_lines(index), *requirements], ignore=ignore)
    return lock_environment(translate_environment(spec, target))


def test_cross_arch_resolution_chooses_the_target_wheels(index: Path) -> None:
    arm = lock_for(index, ARM, "app==1.0")
    assert arm.versions() == {"app": "1.0", "fastlib": "1.0"}  # x86dep: x86_64 only marker
    assert not arm.from_cache and arm.resolver == "uv"
    x86 = lock_for(index, X86, "app==1.0")
    assert x86.versions() == {"app": "1.0", "fastlib": "1.0", "x86dep": "1.0"}
    # The index is a directory of this machine, which no VM can read: the VMs install with no
    # index, from the pinned wheels that travel in the bundle; no path reaches their lock.
    assert str(index) not in arm.requirements_txt and "--" not in arm.requirements_txt
    assert arm.index.no_index and not arm.index.find_links
    assert {w.name for w in arm.links} == {"app-1.0-py3-none-any.whl", f"fastlib-1.0-{ARM_TAG}.whl"}
    assert all(w.is_file() and not w.is_symlink() for w in arm.links)


def test_no_wheel_for_the_target_is_one_clear_error(index: Path) -> None:
    with pytest.raises(EnvironmentLockError) as info:
        lock_for(index, ARM, "app==1.0", "x86only==1.0", "helper==3.0")
    message = str(info.value)
    assert {p.package for p in info.value.problems} == {"x86only", "helper"}
    assert "x86only==1.0 has no wheel (nor source distribution) for aarch64" in message
    assert "helper==3.0 is not on the indexes" in message
    assert "environment_ignore=['x86only']" in message and "arm=False" in message
    # the fix works
    assert lock_for(index, ARM, "app==1.0", "x86only==1.0", ignore=("x86only",)).pins


def test_a_distribution_needing_this_pythons_patch_release_locks(index: Path) -> None:
    # uv reads "--python-version 3.11" as 3.11.0; soupsieve 4.1.3 wants >=3.11.5, say.
    here = sys.version_info
    files = {"patchneed/__init__.py": b""}
    need = f">={here.major}.{here.minor}.{here.micro}"
    write_wheel(index, "patchneed", "1.0", files, requires_python=need)
    assert lock_for(index, X86, "patchneed==1.0").versions() == {"patchneed": "1.0"}


def test_pure_python_sdist_is_allowed_and_said(index: Path) -> None:
    lock = lock_for(index, ARM, "puresrc==1.0")
    assert lock.versions() == {"puresrc": "1.0"} and lock.sdists == ("puresrc",)
    assert any("pure Python" in note for note in lock.notes)


def test_compiled_sdist_is_rejected(index: Path) -> None:
    with pytest.raises(EnvironmentLockError) as info:
        lock_for(index, ARM, "compiledsrc==1.0")
    assert info.value.problems[0].package == "compiledsrc"
    assert "compiled extension (cp311-cp311-linux_x86_64)" in str(info.value)


def test_second_lock_runs_no_resolver(index: Path, isolated: Path) -> None:  # noqa: F811
    spec = resolve_environment_spec([*local_index_lines(index), "app==1.0"])
    translation = translate_environment(spec, ARM)
    first = lock_environment(translation)
    assert not first.from_cache and first.path.is_relative_to(isolated / "locks")
    # Without the index, any resolver run would fail: the cached lock is all that is read.
    shutil.rmtree(index)
    second = lock_environment(translation)
    assert second.from_cache and second.key == first.key
    assert second.pins == first.pins and second.requirements_txt == first.requirements_txt
    # Other inputs, other key: another target is resolved (and fails here: no index left).
    with pytest.raises(EnvironmentLockError):
        lock_environment(translate_environment(spec, X86))


def test_cache_dir_argument(index: Path, tmp_path: Path) -> None:
    spec = resolve_environment_spec([*local_index_lines(index), "helper==1.0"])
    lock = lock_environment(translate_environment(spec, ARM), cache_dir=tmp_path / "mine")
    assert lock.path.parent == tmp_path / "mine" / "locks"


def test_dependencies_keep_their_versions(index: Path, tmp_path: Path) -> None:
    (tmp_path / "needs").mkdir()
    uses = project(tmp_path / "needs", "needshelper", dependencies=("helper",))
    # pip-compile style lock: helper is only a dependency (of local code) pinned at 1.0
    # although 2.0 exists: the lock keeps 1.0.
    req = tmp_path / "requirements.txt"
    req.write_text(
        f"--no-index\n--find-links {index}\n-e {uses}\n"
        "helper==1.0\n    # via needshelper\n"
        "fastlib==1.0\n    # via app\n"
    )
    spec = parse_requirements_file(req)
    lock = lock_environment(translate_environment(spec, ARM))
    assert lock.versions() == {"helper": "1.0"}  # fastlib: a constraint nothing needs
    assert [c.name for c in lock.local_code] == ["needshelper"]


def test_local_project_dependencies_are_resolved(index: Path, tmp_path: Path) -> None:
    proj = project(tmp_path / "src", "mytool", dependencies=("app==1.0",))
    lock = lock_for(index, ARM, f"-e {proj}")
    assert lock.versions() == {"app": "1.0", "fastlib": "1.0"}  # mytool itself is a wheel


def test_cuda_target_resolves_the_gpu_build(index: Path) -> None:
    lock = lock_for(index, Target(accelerator="cuda"), "onnxruntime==1.0")
    assert lock.versions() == {"onnxruntime-gpu": "1.0"}


def test_pip_tools_only_for_this_machine(index: Path) -> None:
    spec = resolve_environment_spec([*local_index_lines(index), "helper==1.0"])
    other = ARM if Target.local().arch == "x86_64" else X86
    with pytest.raises(EnvironmentLockError, match="resolves for this machine"):
        lock_environment(translate_environment(spec, other), resolver="pip-tools")


@network
@needs_pypi
def test_numpy_for_aarch64_from_pypi(isolated: Path) -> None:  # noqa: F811
    spec = resolve_environment_spec(["numpy==2.1.3"])
    lock = lock_environment(translate_environment(spec, ARM))
    assert lock.versions() == {"numpy": "2.1.3"}


@network
@needs_pypi
def test_jax_for_cuda_from_pypi(isolated: Path) -> None:  # noqa: F811
    spec = resolve_environment_spec(["jax==0.4.38"])
    lock = lock_environment(translate_environment(spec, Target(accelerator="cuda")))
    versions = lock.versions()
    assert versions["jax"] == versions["jaxlib"] == "0.4.38"
    assert versions["jax-cuda12-plugin"] == "0.4.38"
    assert any(name.startswith("nvidia-") for name in versions)
