"""The fidelity rule: every distribution here is on the VMs at the same version, by design.

Inventory (dask-rawvm's client side left out), translation (every pin a requirement, CUDA
means CUDA), the lock (what a VM can reach; what only this machine has travels), the check
that compares a VM with this process, and the dask config that travels.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import dask
import pytest
from environment_helpers import (  # noqa: F401  (isolated is a fixture)
    X86,
    isolated,
    needs_pypi,
    network,
    pure,
    write_wheel,
)
from test_environment_inventory import dist_info, fake_env

from dask_rawvm.environment import (
    EnvironmentLockError,
    Target,
    build_bundle,
    inventory_environment,
    lock_environment,
    resolve_environment_spec,
    translate_environment,
    worker_packages,
)
from dask_rawvm.environment.dask_config import serialize, vm_config
from dask_rawvm.environment.fidelity import compare, imported_distributions, installed_versions
from dask_rawvm.environment.inventory import agent_code, loose_module_files
from dask_rawvm.environment.spec import EnvironmentSpec, IndexConfig, PackagePin
from dask_rawvm.environment.translate import CLIENT_SIDE_REASON, Expected

CUDA = Target(accelerator="cuda")
CPU = Target()


# -- inventory --------------------------------------------------------------------------------


def _env_with_dask_rawvm(tmp_path: Path, installer: str) -> tuple[Path, Path]:
    prefix, site = fake_env(tmp_path)
    dist_info(site, "dask-rawvm", "0.1.0", ("moto[server]>=5", "distributed", "bokeh"))
    dist_info(site, "moto", "5.0", ("requests", 'flask ; extra == "server"', "boto3"))
    dist_info(site, "flask", "3.0", ("werkzeug",))
    dist_info(site, "werkzeug", "3.0")
    dist_info(site, "requests", "2.0")
    dist_info(site, "boto3", "1.0")
    dist_info(site, "distributed", "2026.8.0", ("dask", "tornado"))
    dist_info(site, "bokeh", "3.9", ("tornado",))
    dist_info(site, "dask", "2026.8.0", ('pandas ; extra == "dataframe"',))
    dist_info(site, "pandas", "3.1.1")
    dist_info(site, "tornado", "6.6")
    dist_info(site, "userlib", "1.0", ("werkzeug",))  # the user's: needs werkzeug too
    for info in site.glob("*.dist-info"):
        (info / "INSTALLER").write_text(f"{installer}\n")
        if installer == "uv" or info.name.startswith("boto3"):
            (info / "REQUESTED").write_text("")  # uv writes it for everything; pip: asked for
    return prefix, site


@pytest.mark.parametrize("installer", ["pip", "uv"])
def test_every_distribution_is_pinned_but_dask_rawvms_client_side(
    tmp_path: Path, installer: str
) -> None:
    prefix, site = _env_with_dask_rawvm(tmp_path, installer)
    spec = inventory_environment(path=[str(site)], prefix=prefix, cwd=prefix, environ={})
    client_side = {p.name for p in spec.client_side}
    # moto and flask only serve dask-rawvm's client; werkzeug is the user's too (userlib);
    # boto3 was asked for by the user, which only pip records (uv marks every package).
    assert client_side == (
        {"moto", "flask", "requests"} | ({"boto3"} if installer == "uv" else set())
    )
    pins = {p.name for p in spec.packages}
    assert "dask-rawvm" not in pins and not client_side & pins
    assert {"pandas", "werkzeug", "tornado", "distributed", "bokeh"} <= pins
    assert spec.complete

    translation = translate_environment(spec, CPU, extra=worker_packages())
    # pandas only completes dask's "dataframe" extra, dask was installed without it: the old
    # root-only lock left it out. Every distribution is a requirement now.
    assert "pandas==3.1.1" in translation.requirements
    assert "werkzeug==3.0" in translation.requirements
    assert set(translation.dependencies) >= {"pandas", "werkzeug", "tornado"}
    dropped = {d.package for d in translation.decisions if d.reason == CLIENT_SIDE_REASON}
    assert dropped == client_side
    agent = next(c for c in translation.local_code if c.name == "dask-rawvm")
    assert agent.kind == "agent"


def test_agent_wheel_is_dask_rawvm_without_dependencies(tmp_path: Path, isolated: Path) -> None:  # noqa: F811
    from dask_rawvm.environment.bundle import build_local_wheel

    code = agent_code()
    wheel = build_local_wheel(code, Target.local(), tmp_path)
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        metadata = next(archive.read(n) for n in names if n.endswith("METADATA")).decode()
    assert "dask_rawvm/rawvm.yaml" in names and "dask_rawvm/cluster.py" in names
    assert not any("__pycache__" in n for n in names)
    assert f"Version: {code.version}" in metadata and "Requires-Dist" not in metadata


def test_local_code_ships_whatever_the_environment_is(
    tmp_path: Path,
    isolated: Path,  # noqa: F811
) -> None:
    (tmp_path / "analysis.py").write_text("VALUE = 1\n")
    package = tmp_path / "helpers"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "data.csv").write_text("a,b\n1,2\n")  # data: not swept up
    (package / "generated.py").write_text("X = 1\n" * 300_000)  # 1.7 MiB: over the file cap

    spec = resolve_environment_spec(["toolz==1.0.0"])
    local = {c.name: c for c in spec.local_code}
    code = local[f"rawvm-local-{tmp_path.name.lower().replace('_', '-')}"]
    assert set(code.modules) == {"analysis.py", "helpers"}
    files, left_out = loose_module_files(Path(code.path), code.modules)
    assert {f.name for f in files} == {"analysis.py", "__init__.py"}
    assert any("data.csv (not code)" in why for why in left_out)
    assert any("generated.py" in why and "1 MiB" in why for why in left_out)
    assert any("data.csv" in note for note in spec.notes)  # and said, not silently dropped

    assert not resolve_environment_spec(["toolz==1.0.0"], local_code=False).local_code


# -- translation and lock -----------------------------------------------------------------------


def _spec(pins: list[str], index: IndexConfig) -> EnvironmentSpec:
    packages = tuple(PackagePin(p.split("==")[0], "==" + p.split("==")[1]) for p in pins)
    return EnvironmentSpec("local", packages, index=index, complete=True)


def test_what_only_this_machine_has_travels_in_the_bundle(
    tmp_path: Path,
    served: tuple[Path, str],
    isolated: Path,  # noqa: F811
) -> None:
    remote_dir, remote_url = served
    pure(remote_dir, "public", "1.0")
    local_dir = tmp_path / "mine"
    local_dir.mkdir()
    pure(local_dir, "private", "2.0")
    pure(local_dir, "public", "1.0")  # also here: the VMs still get it from the index
    token_url = remote_url.replace("http://", "http://user:s3cret@")
    index = IndexConfig(no_index=True, find_links=(token_url, str(local_dir)))

    lock = lock_environment(
        translate_environment(_spec(["public==1.0", "private==2.0"], index), CPU)
    )
    assert lock.versions() == {"public": "1.0", "private": "2.0"}
    assert [w.name for w in lock.links] == ["private-2.0-py3-none-any.whl"]
    # Nothing of this machine and no credential in what the VM reads from the bundle...
    assert "mine" not in lock.requirements_txt and "s3cret" not in lock.requirements_txt
    bundle = build_bundle(lock)
    text = "".join(p.read_text(errors="replace") for p in bundle.path.rglob("*") if p.is_file())
    assert "s3cret" not in text and str(local_dir) not in text
    assert (bundle.path / "links" / "private-2.0-py3-none-any.whl").is_file()
    # ...the index settings reach the install step only, credentials included.
    assert lock.index.install_environment()["UV_FIND_LINKS"] == token_url
    assert lock.index.local_locations() == []


def test_cuda_means_cuda(tmp_path: Path, served: tuple[Path, str], isolated: Path) -> None:  # noqa: F811
    remote_dir, remote_url = served
    write_wheel(remote_dir, "torch", "2.0.0", {"torch/__init__.py": b""}, tag=f"{X86}")
    links = tmp_path / "links"  # like /opt/wheels here: a find-links dir with the CPU build
    links.mkdir()
    write_wheel(links, "torch", "2.0.0+cpu", {"torch/__init__.py": b""}, tag=f"{X86}")
    index = IndexConfig(no_index=True, find_links=(remote_url, str(links)))
    spec = _spec(["torch==2.0.0+cpu"], index)

    gpu = translate_environment(spec, CUDA)
    assert gpu.requirements == ("torch==2.0.0",) and "torch!=2.0.0+cpu" in gpu.constraints
    # What the fidelity check then expects on a GPU VM: the rewrite, not this process's build.
    assert gpu.expected_versions()["torch"] == Expected("torch", "2.0.0")
    gpu_lock = lock_environment(gpu)
    assert gpu_lock.versions() == {"torch": "2.0.0"} and not gpu_lock.links
    cpu_lock = lock_environment(translate_environment(spec, CPU))
    assert cpu_lock.versions() == {"torch": "2.0.0+cpu"}  # the same build, which travels
    assert [w.name for w in cpu_lock.links] == [f"torch-2.0.0+cpu-{X86}.whl"]

    # A dependency that only comes as a CPU build: the CUDA lock refuses it before launch.
    pure(remote_dir, "usestorch", "1.0", requires=("torch",))
    (remote_dir / f"torch-2.0.0-{X86}.whl").unlink()
    write_wheel(remote_dir, "torch", "2.0.0+cpu", {"torch/__init__.py": b""}, tag=f"{X86}")
    with pytest.raises(EnvironmentLockError, match=r"torch==2.0.0\+cpu is a CPU build"):
        lock_environment(translate_environment(_spec(["usestorch==1.0"], index), CUDA))


def test_a_dependency_the_target_cannot_have_is_left_to_the_resolver(
    tmp_path: Path,
    isolated: Path,  # noqa: F811
) -> None:
    links = tmp_path / "links"
    links.mkdir()
    pure(links, "app", "1.0")
    write_wheel(links, "x86helper", "1.0", {"x86helper/__init__.py": b""}, tag=X86)
    spec = EnvironmentSpec(
        "local",
        (PackagePin("app", "==1.0"), PackagePin("x86helper", "==1.0", root=False)),
        index=IndexConfig(no_index=True, find_links=(str(links),)),
        complete=True,
    )
    lock = lock_environment(translate_environment(spec, Target(arch="aarch64")))
    assert lock.versions() == {"app": "1.0"}
    assert any("x86helper==1.0" in note and "left to the resolver" in note for note in lock.notes)
    # A package the user asked for (a root) is an error instead, as before.
    root = EnvironmentSpec("local", (PackagePin("x86helper", "==1.0"),), index=spec.index)
    with pytest.raises(EnvironmentLockError, match=r"x86helper==1\.0 has no wheel"):
        lock_environment(translate_environment(root, Target(arch="aarch64")))


def test_cuda_runtime_libraries_are_relaxed_on_a_cpu_target() -> None:
    spec = EnvironmentSpec(
        "local",
        (
            PackagePin("torch", "==2.13.0"),
            PackagePin("nvidia-cublas", "==13.1.1.3", root=False),
            PackagePin("cuda-toolkit", "==13.0.3.0", root=False),
        ),
        complete=True,
    )
    translation = translate_environment(spec, Target(arch="aarch64"))
    assert translation.requirements == ("torch==2.13.0",)
    assert {"nvidia-cublas==13.1.1.3", "cuda-toolkit==13.0.3.0"} <= set(translation.constraints)
    assert {d.package for d in translation.decisions if d.action == "relax"} == {
        "nvidia-cublas",
        "cuda-toolkit",
    }


@network
@needs_pypi
def test_cpu_torch_from_find_links_becomes_the_cuda_build(
    tmp_path: Path,
    isolated: Path,  # noqa: F811
) -> None:
    # This machine's pip configuration has exactly this: a find-links directory holding
    # torch 2.13.0+cpu, from which the environment's torch was installed.
    links = tmp_path / "wheels"
    links.mkdir()
    tag = "cp311-cp311-manylinux_2_28_x86_64"
    write_wheel(links, "torch", "2.13.0+cpu", {"torch/__init__.py": b""}, tag=tag)
    prefix, site = fake_env(tmp_path)
    dist_info(site, "torch", "2.13.0+cpu", ("filelock",))
    dist_info(site, "filelock", "3.0")
    spec = inventory_environment(
        path=[str(site)], prefix=prefix, cwd=prefix, environ={"PIP_FIND_LINKS": str(links)}
    )
    lock = lock_environment(translate_environment(spec, CUDA))
    versions = lock.versions()
    assert versions["torch"] == "2.13.0"  # PyPI's CUDA build, same version
    assert not any("+cpu" in pin for pin in lock.pins)
    assert any(name.startswith("nvidia-") for name in versions)
    assert not lock.links  # nothing of /opt/wheels-style directories travels


# -- the check ----------------------------------------------------------------------------------


def test_compare_a_vm_with_this_process() -> None:
    here = {"pandas": "3.1.1", "onnxruntime": "1.0", "pywin32": "306", "toolz": "1.0", "s3fs": "1"}
    expected = {
        "onnxruntime": Expected("onnxruntime-gpu", "1.0"),  # translated: not a difference
        "pywin32": Expected("pywin32", None, False, "Windows-only"),  # by design
        "s3fs": Expected("s3fs", None, False, "left out by environment_ignore", ignored=True),
    }
    same = {"pandas": "3.1.1", "onnxruntime-gpu": "1.0", "toolz": "1.0"}
    report = compare(here, same, expected, "worker worker-0", imported={"pandas", "pywin32"})
    assert not report.differences and report.left_out.keys() == {"pywin32", "s3fs"}

    # The user ignored s3fs and this process imports it: the workers will not have it.
    report = compare(here, same, expected, "worker worker-0", imported={"s3fs"})
    assert [d.package for d in report.errors] == ["s3fs"]
    assert "s3fs: 1 here, missing on worker worker-0 (left out by environment_ignore)" in (
        report.error_message()
    )

    drifted = {"pandas": "3.0.0", "onnxruntime-gpu": "1.1"}
    report = compare(here, drifted, expected, "the scheduler VM", imported={"pandas"})
    assert [d.package for d in report.errors] == ["pandas"]
    assert "pandas: 3.1.1 here, 3.0.0 on the scheduler VM" in report.error_message()
    assert "environment_check='warn'" in report.error_message()
    assert {d.package for d in report.warnings} == {"onnxruntime", "toolz"}
    assert "onnxruntime-gpu 1.1" in report.warning_message()


def test_installed_and_imported_distributions_of_this_process() -> None:
    versions = installed_versions()
    assert versions["dask"] == dask.__version__
    assert {"dask", "packaging"} <= imported_distributions()


# -- dask config --------------------------------------------------------------------------------


def test_the_client_config_for_the_vms_names_nothing_of_this_machine() -> None:
    import socket

    settings = {
        "my-key": 1,
        "distributed.worker.memory.target": 0.42,
        "temporary-directory": "/scratch/me",
        "distributed.comm.tls.ca-file": "/home/me/ca.pem",
        "my-service": f"tcp://{socket.gethostname()}:9000",
        "paths": ["keep-me", "~/private"],
        "rawvm.local.boot-delay": "1s",
    }
    with dask.config.set(settings):
        config = vm_config()
        travelled = dask.config.deserialize(serialize())
    assert config["my-key"] == 1 and config["paths"] == ["keep-me"]
    assert config["distributed"]["worker"]["memory"]["target"] == 0.42
    assert "temporary-directory" not in config and "my-service" not in config
    assert "ca-file" not in config["distributed"]["comm"]["tls"]
    assert "rawvm" not in config
    assert travelled["my-key"] == 1
