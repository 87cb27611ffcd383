"""Turn ``environment=`` (``"local"``, a list of requirements, a lock file) into a spec."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from packaging.utils import canonicalize_name

from dask_rawvm.environment.indexes import read_index_config
from dask_rawvm.environment.inventory import inventory_environment
from dask_rawvm.environment.lockfiles import (
    parse_conda_lock,
    parse_requirement_lines,
    parse_requirements_file,
    parse_uv_lock,
)
from dask_rawvm.environment.spec import EnvironmentSpec, EnvironmentSpecError

# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def resolve_environment_spec(
    environment: str | os.PathLike[str] | Sequence[str] = "local",
    ignore: Iterable[str] = (),
) -> EnvironmentSpec:
    """Turn ``RawVMCluster(environment=..., environment_ignore=...)`` into a spec.

    Parameters
    ----------
    environment : "local", list of str, or path
        ``"local"``: the running environment (:func:`inventory_environment`). A list: PEP 508
        requirements (and ``requirements.txt`` option lines such as ``-e ./pkg`` or
        ``--index-url URL``). A path: ``requirements.txt`` (pins, hashes, ``-e`` lines,
        ``--index-url`` lines), ``uv.lock`` or ``conda-lock.yml``.
    ignore : iterable of str
        Package names to leave out on the VMs (recorded as decisions by the translation).

    Returns
    -------
    EnvironmentSpec

    Raises
    ------
    EnvironmentSpecError
        The argument is neither ``"local"``, a list, nor an existing lock file.
    """
    ignored = tuple(sorted({canonicalize_name(name) for name in ignore}))
    if isinstance(environment, str) and environment == "local":
        spec = inventory_environment()
    elif isinstance(environment, (str, os.PathLike)):
        spec = read_lock_file(environment)
    elif isinstance(environment, Sequence):
        spec = parse_requirement_lines(list(environment), base_dir=Path.cwd())
        spec = replace(spec, index=read_index_config().merged(spec.index))
    else:
        raise EnvironmentSpecError(
            f"environment must be 'local', a list of requirements or a lock file path, "
            f"not {type(environment).__name__}"
        )
    return replace(spec, ignore=ignored)


def read_lock_file(path: str | os.PathLike[str]) -> EnvironmentSpec:
    """Read ``requirements.txt``, ``uv.lock`` or ``conda-lock.yml`` by its name.

    Parameters
    ----------
    path : path-like
        The lock file.

    Returns
    -------
    EnvironmentSpec
    """
    file = Path(path)
    if not file.is_file():
        raise EnvironmentSpecError(
            f"environment={str(path)!r} is not 'local' and no such lock file exists "
            "(a list of requirements must be passed as a list)"
        )
    name = file.name.lower()
    if name.endswith(".lock") or name.endswith(".toml"):
        return parse_uv_lock(file)
    if name.endswith((".yml", ".yaml")):
        return parse_conda_lock(file)
    spec = parse_requirements_file(file)
    return replace(spec, index=read_index_config().merged(spec.index))


