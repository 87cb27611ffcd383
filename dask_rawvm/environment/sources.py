"""Turn ``environment=`` (``"local"``, a list of requirements, a lock file) into a spec."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from packaging.utils import canonicalize_name

from dask_rawvm.environment.indexes import read_index_config
from dask_rawvm.environment.inventory import inventory_environment, local_code_here
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
    local_code: bool = True,
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
    local_code : bool
        Ship this environment's local code (editable and local projects, loose modules next
        to the script or notebook) whatever ``environment`` is; False ships none of it.

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
        if not local_code:
            kept = tuple(c for c in spec.local_code if c.kind not in ("project", "modules"))
            spec = replace(spec, local_code=kept)
        return replace(spec, ignore=ignored)
    if isinstance(environment, (str, os.PathLike)):
        spec = read_lock_file(environment)
    elif isinstance(environment, Sequence):
        spec = parse_requirement_lines(list(environment), base_dir=Path.cwd())
        spec = replace(spec, index=read_index_config().merged(spec.index))
    else:
        raise EnvironmentSpecError(
            f"environment must be 'local', a list of requirements or a lock file path, "
            f"not {type(environment).__name__}"
        )
    if local_code:
        spec = _with_local_code(spec)
    return replace(spec, ignore=ignored)


def _with_local_code(spec: EnvironmentSpec) -> EnvironmentSpec:
    """``spec`` plus the running environment's local code it does not already have."""
    code, notes = local_code_here()
    named = {c.name for c in spec.local_code} | {p.name for p in spec.packages}
    added = tuple(c for c in code if c.name not in named)
    return replace(spec, local_code=spec.local_code + added, notes=spec.notes + notes)


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


