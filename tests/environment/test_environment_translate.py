"""Translation rules: one test per rule, and the single untranslatable-environment error."""

from __future__ import annotations

from pathlib import Path

import pytest

from dask_rawvm.environment import (
    EnvironmentSpec,
    EnvironmentTranslationError,
    LocalCode,
    PackagePin,
    Target,
    translate_environment,
)
from dask_rawvm.environment.lockfiles import parse_requirement_lines
from dask_rawvm.environment.spec import IndexConfig

CPU = Target()
CUDA12 = Target(accelerator="cuda", cuda_major=12)
CUDA13 = Target(accelerator="cuda", cuda_major=13)
ARM = Target(arch="aarch64")


def spec_of(*lines: str, ignore: tuple[str, ...] = (), **kwargs: object) -> EnvironmentSpec:
    spec = parse_requirement_lines(list(lines), Path("."))
    return EnvironmentSpec(
        origin="requirements",
        packages=spec.packages,
        ignore=ignore,
        **kwargs,  # type: ignore[arg-type]
    )


def translated(target: Target, *lines: str, **kwargs: object) -> list[str]:
    return list(translate_environment(spec_of(*lines, **kwargs), target).requirements)


def decision(target: Target, line: str) -> tuple[str, str | None, str]:
    translation = translate_environment(spec_of(line), target, strict=False)
    d = translation.decisions[0]
    return d.action, d.after, d.reason


def test_target_platform_strings() -> None:
    assert Target(glibc="2.28").python_platform == "x86_64-manylinux_2_28"
    assert Target(arch="aarch64", glibc="2.28").python_platform == "aarch64-manylinux_2_28"
    assert Target(arch="arm64").arch == "aarch64"
    assert Target(glibc="2.12").python_platform == "x86_64-manylinux_2_17"  # uv's oldest
    assert CUDA12.describe() == "x86_64 cuda12 py3.11 glibc2.34"
    assert Target(accelerator="cuda").cuda_major == 12
    with pytest.raises(ValueError):
        Target(arch="riscv64")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Target(cuda_major=12)
    local = Target.local()
    assert local.python_version.count(".") == 1 and local.arch in ("x86_64", "aarch64")


def test_same_versions_everywhere() -> None:
    for target in (CPU, ARM, CUDA12):
        assert translated(target, "numpy==2.1.0", "pandas==2.2.3") == [
            "numpy==2.1.0",
            "pandas==2.2.3",
        ]
    action, after, reason = decision(ARM, "numpy==2.1.0")
    assert (action, after) == ("keep", "numpy==2.1.0") and "same version" in reason


def test_torch_build_labels() -> None:
    action, after, reason = decision(CUDA12, "torch==2.13.0+cpu")
    assert (action, after) == ("rewrite", "torch==2.13.0")
    assert "CUDA builds" in reason
    assert translated(CPU, "torch==2.5.1+cu121", "torchvision==0.20.1+cu121") == [
        "torch==2.5.1",
        "torchvision==0.20.1",
    ]
    # The same build on a target with an index that may carry it: kept.
    private = IndexConfig(extra_index_urls=("https://download.pytorch.org/whl/cpu",))
    assert translated(CPU, "torch==2.5.1+cpu", index=private) == ["torch==2.5.1+cpu"]
    # A label that is not a build name (a company build) is not touched.
    assert translated(CUDA12, "mylib==1.0+corp.3") == ["mylib==1.0+corp.3"]


def test_jax_cuda_extra() -> None:
    assert translated(CUDA12, "jax==0.4.35", "jaxlib==0.4.35") == [
        "jax[cuda12]==0.4.35",
        "jaxlib==0.4.35",
    ]
    assert translated(CUDA13, "jax[cuda12]==0.7.0") == ["jax[cuda13]==0.7.0"]
    assert translated(CUDA13, "jax-cuda12-plugin==0.7.0") == ["jax-cuda13-plugin==0.7.0"]
    assert translated(CPU, "jax[cuda12]==0.4.35", "jax-cuda12-plugin==0.4.35") == ["jax==0.4.35"]


def test_cupy() -> None:
    assert translated(CUDA12, "cupy==13.3.0") == ["cupy-cuda12x==13.3.0"]
    assert translated(CUDA12, "cupy-cuda11x==13.3.0") == ["cupy-cuda12x==13.3.0"]
    with pytest.raises(EnvironmentTranslationError) as info:
        translated(CPU, "cupy-cuda12x==13.3.0")
    assert "no CPU build" in str(info.value)


def test_cpu_and_cuda_distributions() -> None:
    assert translated(CUDA12, "onnxruntime==1.20.1") == ["onnxruntime-gpu==1.20.1"]
    assert translated(CPU, "onnxruntime-gpu==1.20.1") == ["onnxruntime==1.20.1"]
    assert translated(CUDA12, "tensorflow-cpu==2.17.0") == ["tensorflow[and-cuda]==2.17.0"]
    assert translated(CUDA12, "tensorflow==2.17.0") == ["tensorflow[and-cuda]==2.17.0"]
    assert translated(CPU, "tensorflow[and-cuda]==2.17.0") == ["tensorflow==2.17.0"]
    assert translated(CUDA12, "xgboost-cpu==2.1.1") == ["xgboost==2.1.1"]


def test_rapids_and_nvidia_libraries() -> None:
    assert translated(CUDA12, "cudf-cu11==24.4.0") == ["cudf-cu12==24.4.0"]
    with pytest.raises(EnvironmentTranslationError, match="cudf-cu12"):
        translated(CPU, "cudf-cu12==24.8.0")
    # CUDA 11 runtime libraries pinned as dependencies: the resolver picks CUDA 12's.
    dropped = translate_environment(
        EnvironmentSpec("x", (PackagePin("nvidia-cublas-cu11", "==11.10.3.66", root=False),)),
        CUDA12,
    )
    assert dropped.constraints == () and dropped.changes()[0].action == "drop"


def test_arm_drops_x86_runtime_libraries() -> None:
    lines = (
        "mkl==2024.0.0",
        "mkl-fft==1.3.8",
        "intel-openmp==2024.0.0",
        "tbb==2021.11.0",
        "numpy==2.1.0",
    )
    assert translated(ARM, *lines) == ["numpy==2.1.0"]
    assert translated(CPU, *lines) == sorted(lines)
    action, _, reason = decision(ARM, "mkl==2024.0.0")
    assert action == "drop" and "x86_64-only" in reason


def test_os_only_packages_are_dropped() -> None:
    assert translated(
        CPU,
        "pywin32==306",
        "appnope==0.1.4",
        "pyobjc-core==10.3",
        "pywinpty==2.0.13",
        "rich==13.7.0",
    ) == ["rich==13.7.0"]
    _, _, reason = decision(ARM, "pywin32==306")
    assert "Windows-only" in reason


def test_markers_are_evaluated_for_the_target() -> None:
    spec = EnvironmentSpec(
        "x",
        (
            PackagePin("x86dep", "==1.0", marker="platform_machine == 'x86_64'"),
            PackagePin("winthing", "==1.0", marker="sys_platform == 'win32'"),
            PackagePin("new", "==1.0", marker="python_version >= '3.11'"),
        ),
    )
    assert translate_environment(spec, ARM).requirements == ("new==1.0",)
    assert translate_environment(spec, CPU).requirements == ("new==1.0", "x86dep==1.0")


def test_untranslatable_error_lists_every_package() -> None:
    spec = spec_of("scikit-learn-intelex==2024.0.0", "cupy==13.0.0", "numpy==2.1.0")
    with pytest.raises(EnvironmentTranslationError) as info:
        translate_environment(spec, ARM)
    message = str(info.value)
    assert {p.package for p in info.value.problems} == {"scikit-learn-intelex", "cupy"}
    assert "scikit-learn-intelex: published for x86_64 only" in message
    assert "x86_64 instance type" in message
    assert "cupy: cupy needs an NVIDIA GPU" in message and "gpu=True" in message
    assert "environment_ignore=['cupy', 'scikit-learn-intelex']" in message
    assert "Nothing was launched" in message
    # strict=False hands the same problems back for reporting
    soft = translate_environment(spec, ARM, strict=False)
    assert len(soft.problems) == 2 and soft.requirements == ("numpy==2.1.0",)


def test_ignore() -> None:
    spec = spec_of("cupy==13.0.0", "numpy==2.1.0", ignore=("cupy",))
    translation = translate_environment(spec, CPU)
    assert translation.requirements == ("numpy==2.1.0",)
    assert translation.changes()[0].reason == "left out by environment_ignore"
    # naming the translated distribution works too
    gpu = spec_of("onnxruntime==1.20.1", ignore=("onnxruntime-gpu",))
    assert translate_environment(gpu, CUDA12).requirements == ()


def test_conda_packages() -> None:
    spec = EnvironmentSpec(
        "conda",
        (
            PackagePin("torch", "==2.2.1", "conda", conda_name="pytorch"),
            PackagePin("ffmpeg", "==6.1", "conda", conda_name="ffmpeg", python=False),
        ),
    )
    ok = translate_environment(spec, CPU)
    assert ok.requirements == ("torch==2.2.1",)
    assert "conda package pytorch installed from PyPI as torch" in ok.changes()[-1].reason
    ffmpeg = next(d for d in ok.decisions if d.package == "ffmpeg")  # the conda step's
    assert ffmpeg.action == "drop" and "installed on the VMs from its conda channel" in (
        ffmpeg.reason
    )


def test_worker_packages_are_added() -> None:
    spec = spec_of("numpy==2.1.0", "distributed==2024.1.0")
    extra = [
        PackagePin("distributed", "==2025.1.0"),
        LocalCode("dask-rawvm", "/src/dask-rawvm", "project"),
    ]
    translation = translate_environment(spec, CPU, extra=extra)
    assert "distributed==2024.1.0" in translation.requirements  # the user's choice wins
    assert [c.name for c in translation.local_code] == ["dask-rawvm"]
    assert translation.changes()[0].action == "add"


def test_local_wheel_for_another_arch(tmp_path: Path) -> None:
    wheel = tmp_path / "fastlib-1.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    spec = EnvironmentSpec("x", local_code=(LocalCode("fastlib", str(wheel), "wheel"),))
    assert translate_environment(spec, CPU).local_code
    with pytest.raises(EnvironmentTranslationError, match="not built for aarch64"):
        translate_environment(spec, ARM)


def test_python_version_change_is_recorded() -> None:
    spec = EnvironmentSpec("x", (PackagePin("numpy", "==2.1.0"),), python_version="3.12")
    changes = translate_environment(spec, CPU).changes()
    assert changes[0].package == "python" and changes[0].after == "3.11"
