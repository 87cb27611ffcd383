"""A cluster's machines, by concern: launching and naming (:class:`Launcher`), the files
its machines fetch (:class:`ClusterStore`), the record of machines and cost
(:class:`Ledger`), the provider's lifecycle (:class:`ProviderSession`), the options
(:class:`Settings`), limits (:class:`Limits`), boot diagnostics (:class:`BootWatch`),
the environment's fidelity check (:class:`EnvironmentCheck`), what a worker is
(:class:`WorkerShape`), data on the VMs (:class:`CredentialForwarder`, :func:`ship_files`),
and the scheduler and worker VMs as thin ProcessInterfaces."""

from dask_rawvm.machines.data import CredentialForwarder, check_data_regions, ship_files
from dask_rawvm.machines.environment_check import EnvironmentCheck, EnvironmentMismatch
from dask_rawvm.machines.launcher import Coalescer, Launcher
from dask_rawvm.machines.ledger import Ledger
from dask_rawvm.machines.limits import Limits
from dask_rawvm.machines.names import WORKER_PREFIX, WorkerNames, is_worker_name, worker_index
from dask_rawvm.machines.preflight import preflight
from dask_rawvm.machines.processes import SchedulerVM, WorkerVM
from dask_rawvm.machines.session import ProviderSession, RunningCluster
from dask_rawvm.machines.settings import Settings
from dask_rawvm.machines.shape import WorkerShape, worker_shape
from dask_rawvm.machines.store import ClusterStore
from dask_rawvm.machines.watch import BootWatch

__all__ = [
    "WORKER_PREFIX",
    "BootWatch",
    "ClusterStore",
    "Coalescer",
    "CredentialForwarder",
    "EnvironmentCheck",
    "EnvironmentMismatch",
    "Launcher",
    "Ledger",
    "Limits",
    "ProviderSession",
    "RunningCluster",
    "SchedulerVM",
    "Settings",
    "WorkerNames",
    "WorkerShape",
    "WorkerVM",
    "check_data_regions",
    "is_worker_name",
    "preflight",
    "ship_files",
    "worker_index",
    "worker_shape",
]
