"""An installed conda environment's own records (``conda-meta``) and conda/PyPI names."""

from __future__ import annotations

import os
from pathlib import Path

from packaging.utils import canonicalize_name

from dask_rawvm.environment.readers import as_list, read_json
from dask_rawvm.environment.spec import PackagePin

# --------------------------------------------------------------------------------------------
# conda
# --------------------------------------------------------------------------------------------

#: conda names whose PyPI distribution is named differently. conda-forge names some packages
#: after the upstream project (pytorch), with a ``py-`` prefix for Python bindings of a C/C++
#: library (py-opencv, py-xgboost), or splits a package (matplotlib-base). The complete mapping
#: lives in services this machine may not reach, so only the common divergent ones are kept;
#: any other conda Python package is assumed to have its PyPI name (true for the vast majority).
CONDA_TO_PYPI: dict[str, str] = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "py-opencv": "opencv-python",
    "opencv": "opencv-python",
    "tensorflow-gpu": "tensorflow",
    "py-xgboost": "xgboost",
    "py-xgboost-cpu": "xgboost-cpu",
    "py-xgboost-gpu": "xgboost",
    "py-lightgbm": "lightgbm",
    "matplotlib-base": "matplotlib",
    "msgpack-python": "msgpack",
    "python-graphviz": "graphviz",
    "pytables": "tables",
    "pyqt": "pyqt5",
    "ruamel_yaml": "ruamel-yaml",
    "python-kaleido": "kaleido",
    "python-tzdata": "tzdata",
    "python-fastjsonschema": "fastjsonschema",
    "python-lmdb": "lmdb",
    "gdal": "gdal",
    "py-spy": "py-spy",
    "arrow": "arrow",
    "pyarrow-core": "pyarrow",
    "dask-core": "dask",
    "distributed": "distributed",
}

#: conda packages with no Python code that the VM does not need: the interpreter and its C
#: libraries (the VM's Python has its own), and native libraries that PyPI wheels vendor.
CONDA_RUNTIME = frozenset(
    {
        "python",
        "python_abi",
        "pip",
        "ca-certificates",
        "openssl",
        "tzdata",
        "ncurses",
        "readline",
        "sqlite",
        "tk",
        "xz",
        "zlib",
        "bzip2",
        "zstd",
        "lz4-c",
        "krb5",
        "icu",
        "expat",
        "keyutils",
        "c-ares",
        "cudatoolkit",
        "cudnn",
        "nccl",
        "blas",
        "openblas",
        "mkl",
        "intel-openmp",
        "llvm-openmp",
        "tbb",
        "ld_impl_linux-64",
        "ld_impl_linux-aarch64",
    }
)


def conda_to_pypi(conda_name: str) -> str:
    """The PyPI name of a conda package (see :data:`CONDA_TO_PYPI`)."""
    return canonicalize_name(CONDA_TO_PYPI.get(conda_name, conda_name))


def is_conda_runtime(conda_name: str) -> bool:
    """True for conda packages the VM's Python and PyPI wheels make unnecessary."""
    return (
        conda_name in CONDA_RUNTIME
        or conda_name.startswith(("lib", "_", "cuda-", "mkl"))
        or conda_name.endswith(("-devel", "_impl"))
    )


def read_conda_meta(prefix: str | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """Read ``<prefix>/conda-meta/*.json``.

    Parameters
    ----------
    prefix : path-like
        A conda environment's prefix.

    Returns
    -------
    dict
        conda name -> ``{"name", "version", "channel", "requested", "python", "pypi_name",
        "depends"}``; empty when the prefix is not a conda environment.
    """
    meta = Path(prefix) / "conda-meta"
    if not meta.is_dir():
        return {}
    records: dict[str, dict[str, object]] = {}
    for file in sorted(meta.glob("*.json")):
        data = read_json(file)
        if not data or "name" not in data:
            continue
        name = str(data["name"])
        files = as_list(data.get("files"))
        depends = [str(d).split()[0] for d in as_list(data.get("depends"))]
        records[name] = {
            "name": name,
            "version": str(data.get("version", "")),
            "channel": _channel_name(str(data.get("channel") or "")),
            "requested": bool(data.get("requested_spec")),
            "python": any("site-packages/" in str(f) for f in files) or "python" in depends,
            "pypi_name": conda_to_pypi(name),
            "depends": depends,
        }
    return records


def _channel_name(channel: str) -> str:
    return channel.rstrip("/").rsplit("/", 2)[-2] if "/" in channel else channel


def conda_only_pins(
    conda: dict[str, dict[str, object]], installed: set[str], notes: list[str]
) -> list[PackagePin]:
    """Pins for conda packages not also visible as Python distributions."""
    pins: list[PackagePin] = []
    for record in conda.values():
        name, pypi = str(record["name"]), str(record["pypi_name"])
        if name in CONDA_RUNTIME or (record["python"] and pypi in installed):
            continue  # seen through its .dist-info already
        if not record["python"] and is_conda_runtime(name):
            continue
        if not record["python"] and not record["requested"]:
            notes.append(f"conda package {name} (a dependency with no Python code) is not needed")
            continue
        pins.append(
            PackagePin(
                pypi,
                f"=={record['version']}",
                "conda",
                root=bool(record["requested"]),
                conda_name=name,
                python=bool(record["python"]),
            )
        )
    return pins


