"""The user's environment on every VM: inventory -> translate -> lock -> bundle.

Pure functions (plus the ``uv`` subprocess and a content-addressed cache); no Dask, no cloud.
The cluster calls :func:`prepare_environment` once, before launching anything::

    bundle = prepare_environment("local", Target(arch="aarch64"), ignore=["pywin32"])
    archive = bundle.write_archive(tmp_dir)      # ship it; embed install_script() in user-data
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence

from dask_rawvm.environment.bundle import (
    Bundle,
    EnvironmentBundleError,
    build_bundle,
    build_local_wheel,
    install_commands,
    install_script,
    write_wheel,
)
from dask_rawvm.environment.conda import lock_conda_for
from dask_rawvm.environment.indexes import read_index_config
from dask_rawvm.environment.inventory import installed_distribution, inventory_environment
from dask_rawvm.environment.lock import (
    EnvironmentLockError,
    Lock,
    Resolver,
    default_cache_dir,
    lock_environment,
)
from dask_rawvm.environment.sources import resolve_environment_spec
from dask_rawvm.environment.spec import (
    EnvironmentSpec,
    EnvironmentSpecError,
    IndexConfig,
    LocalCode,
    PackagePin,
    redact_url,
)
from dask_rawvm.environment.target import Target, wheel_fits_target
from dask_rawvm.environment.translate import (
    Decision,
    EnvironmentTranslationError,
    Problem,
    Translation,
    translate_environment,
)

#: What a Dask VM needs whatever the user's environment lists: the scheduler and worker,
#: their dashboards (bokeh), and dask-rawvm's VM-side code (the idle shutdown preload).
WORKER_PACKAGES = ("distributed", "bokeh", "dask-rawvm")

__all__ = [
    "WORKER_PACKAGES",
    "Bundle",
    "Decision",
    "EnvironmentBundleError",
    "EnvironmentLockError",
    "EnvironmentSpec",
    "EnvironmentSpecError",
    "EnvironmentTranslationError",
    "IndexConfig",
    "LocalCode",
    "Lock",
    "PackagePin",
    "Problem",
    "Target",
    "Translation",
    "build_bundle",
    "build_local_wheel",
    "default_cache_dir",
    "install_commands",
    "install_script",
    "inventory_environment",
    "lock_environment",
    "prepare_environment",
    "read_index_config",
    "redact_url",
    "resolve_environment_spec",
    "translate_environment",
    "wheel_fits_target",
    "worker_packages",
    "write_wheel",
]


def worker_packages(names: Iterable[str] = WORKER_PACKAGES) -> list[PackagePin | LocalCode]:
    """The running environment's versions of the packages a worker needs.

    dask-rawvm itself is its own package files, shipped without dependencies.
    """
    found = (installed_distribution(name) for name in names)
    return [item for item in found if item is not None]


def prepare_environment(
    environment: str | os.PathLike[str] | Sequence[str] = "local",
    target: Target | None = None,
    ignore: Iterable[str] = (),
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    resolver: Resolver = "uv",
    worker: Iterable[str] = WORKER_PACKAGES,
    local_code: bool = True,
) -> Bundle:
    """Inventory, translate, lock and bundle an environment for ``target``: one call.

    Parameters
    ----------
    environment : "local", list of str, or path
        See :func:`resolve_environment_spec`.
    target : Target, optional
        The VMs' platform (default: this machine's).
    ignore : iterable of str
        ``environment_ignore``: packages left out.
    cache_dir : path-like, optional
        Cache root (default ``$DASK_RAWVM_CACHE_DIR`` or ``~/.cache/dask-rawvm``).
    resolver : {"uv", "pip-tools"}
        See :func:`lock_environment`.
    worker : iterable of str
        Packages added in this environment's version when ``environment`` lacks them.
    local_code : bool
        Ship this environment's local code whatever ``environment`` is (see
        :func:`resolve_environment_spec`).

    Returns
    -------
    Bundle
        ``bundle.lock.from_cache`` tells whether a resolver ran.

    Raises
    ------
    EnvironmentTranslationError
        (or its subclasses for the lock and bundle steps) listing every package that cannot
        be installed on the target, why, and the fix.
    """
    target = target or Target.local()
    spec = resolve_environment_spec(environment, ignore=ignore, local_code=local_code)
    translation = translate_environment(spec, target, extra=worker_packages(worker))
    lock = lock_environment(translation, cache_dir=cache_dir, resolver=resolver)
    conda = lock_conda_for(spec, target, cache_dir)
    bundle = build_bundle(lock, cache_dir=cache_dir, conda=conda)
    return dataclasses.replace(bundle, expected=translation.expected_versions())
