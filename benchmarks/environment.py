"""Benchmark of the environment pipeline: one line per figure.

    python benchmarks/environment.py [--local-index]

Figures: inventory of this environment and of a synthetic 300-package one (target < 0.3 s);
lock time cold and warm for an aarch64 and a CUDA target (PyPI when reachable, else a local
index of generated wheels; the line says which); VM install time from a warm cache, uv next to
pip for the same lock (target: uv >= 5x faster); the fidelity of a worker's environment (its
distributions against this process's, after translation) for this environment and for a
fresh data-science venv (target: 0 missing, 0 different). The machine's pip/uv configuration
is ignored for the lock and install figures, so that they are about PyPI (or the local
index), not a mirror.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from environment_helpers import make_index, pure, pypi_reachable

from dask_rawvm.environment import (
    Target,
    inventory_environment,
    lock_environment,
    resolve_environment_spec,
    translate_environment,
)
from dask_rawvm.environment.lock import uv_binary


def isolate(root: Path) -> None:
    os.environ["PIP_CONFIG_FILE"] = os.devnull
    os.environ["UV_NO_CONFIG"] = "1"
    for name in list(os.environ):
        if name.startswith(("PIP_INDEX", "PIP_EXTRA", "PIP_FIND", "UV_INDEX", "UV_EXTRA")):
            del os.environ[name]
    os.environ["DASK_RAWVM_CACHE_DIR"] = str(root / "rawvm-cache")


def median_time(func: Callable[[], object], runs: int = 7) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def line(label: str, seconds: float, note: str = "") -> None:
    print(f"{label:<58} {seconds:9.4f} s  {note}".rstrip(), flush=True)


def synthetic_env(root: Path, count: int = 300) -> tuple[Path, Path]:
    prefix = root / "synthetic"
    site = prefix / "lib" / "python3.11" / "site-packages"
    for i in range(count):
        info = site / f"pkg{i:03d}-1.0.dist-info"
        info.mkdir(parents=True)
        requires = f"Requires-Dist: pkg{i + 1:03d}>=1\n" if i % 3 else ""
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: pkg{i:03d}\nVersion: 1.0\n{requires}\n" + "x" * 4000
        )
        (info / "INSTALLER").write_text("pip\n")
    return prefix, site


def bench_inventory(root: Path) -> None:
    seconds = median_time(inventory_environment)
    count = len(inventory_environment().packages)
    line("inventory: this environment", seconds, f"{count} packages (target < 0.3 s)")
    prefix, site = synthetic_env(root)
    seconds = median_time(
        lambda: inventory_environment(path=[str(site)], prefix=prefix, cwd=prefix, environ={})
    )
    line("inventory: synthetic environment", seconds, "300 packages (target < 0.3 s)")


def lock_specs(root: Path, online: bool) -> list[tuple[str, Target, list[str], str]]:
    if online:
        arm = ["distributed==2026.8.0", "dask[array]==2026.8.0", "pandas==2.2.3", "mkl==2024.0.0"]
        cuda = ["torch==2.5.1+cpu", "jax==0.4.38", "onnxruntime==1.20.0", "numpy==2.1.3"]
        return [
            ("aarch64", Target(arch="aarch64"), arm, "PyPI"),
            ("CUDA 12 x86_64", Target(accelerator="cuda"), cuda, "PyPI"),
        ]
    index = make_index(root / "local-index")
    lines = ["--no-index", f"--find-links {index}"]
    return [
        ("aarch64", Target(arch="aarch64"), [*lines, "app==1.0", "helper==1.0"], "local index"),
        ("CUDA 12 x86_64", Target(accelerator="cuda"), [*lines, "onnxruntime==1.0"], "local index"),
    ]


def bench_lock(root: Path, online: bool) -> None:
    for label, target, requirements, where in lock_specs(root, online):
        translation = translate_environment(resolve_environment_spec(requirements), target)
        cache = root / f"locks-{label.split()[0]}"
        os.environ["UV_CACHE_DIR"] = str(root / f"uv-cold-{label.split()[0]}")
        start = time.perf_counter()
        lock = lock_environment(translation, cache_dir=cache)
        cold = time.perf_counter() - start
        pins = len(lock.pins)
        line(f"lock {label}: cold (empty lock and uv caches)", cold, f"{pins} pins, {where}")
        start = time.perf_counter()
        lock_environment(translation, cache_dir=cache, refresh=True)
        line(f"lock {label}: re-resolve (warm uv cache)", time.perf_counter() - start, where)
        seconds = median_time(
            lambda t=translation, c=cache: lock_environment(t, cache_dir=c), runs=5
        )
        hit = lock_environment(translation, cache_dir=cache).from_cache
        line(f"lock {label}: warm (lock cache hit)", seconds, f"from_cache={hit}, no resolver")
        del os.environ["UV_CACHE_DIR"]


def install_lock(root: Path, online: bool) -> tuple[Path, str]:
    if online:
        requirements = ["distributed==2026.8.0", "dask[array,dataframe]==2026.8.0"]
        where = "PyPI"
    else:
        index = root / "install-index"
        index.mkdir()
        for i in range(40):
            pure(index, f"benchpkg{i:02d}")
        requirements = ["--no-index", f"--find-links {index}"]
        requirements += [f"benchpkg{i:02d}==1.0" for i in range(40)]
        where = "local index"
    translation = translate_environment(resolve_environment_spec(requirements), Target.local())
    lock = lock_environment(translation, cache_dir=root / "install-locks")
    return lock.path, f"{len(lock.pins)} packages, {where}"


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return time.perf_counter() - start


def uv_install(requirements: Path, venv: Path, env: dict[str, str]) -> tuple[float, float]:
    shutil.rmtree(venv, ignore_errors=True)
    uv = uv_binary()
    create = timed([uv, "venv", "-q", "--python", sys.executable, str(venv)], env)
    python = str(venv / "bin" / "python")
    install = timed([uv, "pip", "sync", "-q", "--python", python, str(requirements)], env)
    return create, install


def pip_install(requirements: Path, venv: Path, env: dict[str, str]) -> tuple[float, float]:
    shutil.rmtree(venv, ignore_errors=True)
    create = timed([sys.executable, "-m", "venv", str(venv)], env)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps"]
    install = timed([*pip, "-r", str(requirements)], env)
    return create, install


def bench_install(root: Path, online: bool) -> None:
    requirements, what = install_lock(root, online)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("UV_", "PIP_"))},
        "UV_CACHE_DIR": str(root / "uv-install-cache"),
        "PIP_CACHE_DIR": str(root / "pip-install-cache"),
        "PIP_CONFIG_FILE": os.devnull,
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    }
    for run in (uv_install, pip_install):  # warm both caches first, untimed
        run(requirements, root / "warmup-venv", env)
    uv_create, uv_inst = uv_install(requirements, root / "uv-venv", env)
    pip_create, pip_inst = pip_install(requirements, root / "pip-venv", env)
    line("VM install, warm cache: uv venv + uv pip sync", uv_create + uv_inst, what)
    line("VM install, warm cache: python -m venv + pip install", pip_create + pip_inst, what)
    ratio = (pip_create + pip_inst) / (uv_create + uv_inst)
    line("VM install, warm cache: install step only, uv", uv_inst)
    line("VM install, warm cache: install step only, pip", pip_inst)
    print(f"{'VM install: uv speed-up over pip (total)':<58} {ratio:9.1f} x  (target >= 5x)")


#: Run in an environment's Python: a cluster on the local cloud, and what its worker has of
#: this environment's distributions (missing, different), after translation.
FIDELITY_PROBE = """
import json
from dask_rawvm import RawVMCluster
from dask_rawvm.environment.fidelity import compare, installed_versions
from dask_rawvm.environment.inventory import client_side_here
with RawVMCluster(n_workers=1, scheduler="local", progress=False) as cluster:
    client = cluster.get_client()
    client.wait_for_workers(1, timeout=900)
    there = next(iter(client.run(installed_versions).values()))
    expected = cluster.store.bundles["worker"].expected
here = installed_versions()
report = compare(here, there, expected, "worker", exempt=client_side_here())
missing = [d.package for d in report.differences if d.there == "missing"]
different = [d.package for d in report.differences if d.there != "missing"]
print("FIDELITY", json.dumps([len(here), missing, different]))
"""


def fidelity_of(python: str, cwd: Path) -> tuple[int, list[str], list[str]]:
    done = subprocess.run(
        [python, "-c", FIDELITY_PROBE], cwd=cwd, capture_output=True, text=True, timeout=1800
    )
    found = [line for line in done.stdout.splitlines() if line.startswith("FIDELITY ")]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"fidelity probe failed:\n{done.stderr[-3000:]}")
    count, missing, different = json.loads(found[0].removeprefix("FIDELITY "))
    return int(count), list(missing), list(different)


def datascience_venv(root: Path) -> Path:
    """A fresh venv with dask-rawvm, dask[dataframe], pyarrow and s3fs (from the index)."""
    venv = root / "ds-venv"
    uv = uv_binary()
    subprocess.run([uv, "venv", "-q", "--python", sys.executable, str(venv)], check=True)
    repo = Path(__file__).resolve().parent.parent
    install = [uv, "pip", "install", "-q", "--python", str(venv / "bin" / "python")]
    subprocess.run([*install, "-e", str(repo), "dask[dataframe]", "pyarrow", "s3fs"], check=True)
    return venv


def bench_fidelity(root: Path, online: bool) -> None:
    """Distributions here against a worker's, for this environment and a data-science venv
    (target: 0 missing and 0 different, after translation; dask-rawvm's client side aside)."""
    envs = [("this environment", sys.executable)]
    if online:
        envs.append(("data-science venv", str(datascience_venv(root) / "bin" / "python")))
    for label, python in envs:
        count, missing, different = fidelity_of(python, root)
        note = f"{count} distributions here; missing {missing or 0}, different {different or 0}"
        print(
            f"{'fidelity: ' + label + ', missing + different on a worker':<58} "
            f"{len(missing) + len(different):9d}    {note} (target 0 and 0)",
            flush=True,
        )


def main() -> None:
    # --local-index: use generated wheels even when PyPI is reachable
    online = "--local-index" not in sys.argv and pypi_reachable()
    with tempfile.TemporaryDirectory(prefix="rawvm-bench-") as tmp:
        root = Path(tmp)
        bench_inventory(root)
        bench_fidelity(root, online)  # before isolate(): as a user's machine is configured
        isolate(root)
        bench_lock(root, online)
        bench_install(root, online)


if __name__ == "__main__":
    main()
