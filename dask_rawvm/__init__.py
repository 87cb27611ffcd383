"""dask_rawvm: Dask clusters on raw VMs, fast and safe.

Layers, bottom to top (a module imports only from layers below its own, or from its own
group; ``tests/neutral/test_architecture.py`` holds it over the import graph):

=====  ===========  =====================================================================
layer  group        modules
=====  ===========  =====================================================================
0      neutral      ``errors``, ``backoff``, ``needs`` (needs and markets), ``config`` +
                    ``rawvm.yaml``, ``tls``, ``cost``, ``progress``, ``idle_shutdown``
                    (the scheduler preload that runs on the VM)
1      environment  ``environment/``: inventory, translate, lock, bundle, bootstrap
1      localcloud   ``localcloud/``: the embedded EC2-compatible cloud
2      providers    ``providers/``: the interface (``base``), the registry, ``ec2/``,
                    ``ssh``, ``localcloud`` (the local cloud as a provider)
3      machines     ``machines/``: launching and naming, the cluster's store, the
                    ledger, the scheduler and worker VMs as ProcessInterfaces
4      cluster      ``cluster``: ``RawVMCluster`` and its ``Adaptive``; knows Dask, not clouds
5      commands     ``cli``, ``demo``
=====  ===========  =====================================================================

Where each concern lives: options in ``config`` + ``rawvm.yaml``; what a worker needs and
where it is bought in ``needs``; instance types and prices in ``providers/ec2/catalog``;
TLS material in ``tls``, security groups in ``providers/ec2/security_groups``; cost
estimate and budget guard in ``cost``; errors in ``errors`` (all under
:class:`RawVMError`); retries in ``backoff``.

The top-level names are imported when first used, so that ``dask_rawvm.idle_shutdown``,
imported on a scheduler VM, loads no cloud, no local cloud and no cluster.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from dask_rawvm import config as _config  # noqa: F401  (installs rawvm.yaml into dask's config)
from dask_rawvm.cost import BudgetExceeded
from dask_rawvm.errors import (
    CatalogError,
    OptionError,
    ProviderError,
    RawVMError,
    UnknownOptionError,
    WorkerBootTimeoutError,
)

if TYPE_CHECKING:
    from dask_rawvm.cluster import RawVMAdaptive, RawVMCluster
    from dask_rawvm.localcloud import LocalCloud
    from dask_rawvm.machines.environment_check import EnvironmentMismatch

__version__ = "0.1.0"
__all__ = [
    "BudgetExceeded",
    "CatalogError",
    "EnvironmentMismatch",
    "LocalCloud",
    "OptionError",
    "ProviderError",
    "RawVMAdaptive",
    "RawVMCluster",
    "RawVMError",
    "UnknownOptionError",
    "WorkerBootTimeoutError",
    "__version__",
]

#: Names imported on first use, by the module that defines them.
_LAZY = {
    "RawVMCluster": "dask_rawvm.cluster",
    "RawVMAdaptive": "dask_rawvm.cluster",
    "LocalCloud": "dask_rawvm.localcloud",
    "EnvironmentMismatch": "dask_rawvm.machines.environment_check",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'dask_rawvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
