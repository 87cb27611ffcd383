"""What every provider offers: launch N machines of a spec, terminate, describe, clean up.

Providers know clouds, not Dask: the cluster hands them a :class:`LaunchSpec`
(role, type, user-data, tags, count) and gets :class:`Machine` records back. A provider
builds itself from the cluster's options (:meth:`Provider.from_options`), which is how
the registry in :mod:`dask_rawvm.providers` makes one by name.
"""

from __future__ import annotations

import abc
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dask_rawvm.config import ClusterOptions
from dask_rawvm.data import ForwardedCredentials
from dask_rawvm.environment.artifact import ArtifactURLs
from dask_rawvm.environment.bootstrap import IDENTITY_FROM_VARIABLES
from dask_rawvm.environment.target import Target
from dask_rawvm.errors import ProviderError
from dask_rawvm.needs import Market, Needs, SpotPolicy

if TYPE_CHECKING:
    from typing_extensions import Self

#: The tag every resource of a cluster carries: its value is the cluster's name.
CLUSTER_TAG = "dask-rawvm:cluster"
#: "scheduler" or "worker".
ROLE_TAG = "dask-rawvm:role"


@dataclass(frozen=True)
class LaunchSpec:
    """``count`` machines booting the same user-data, asked for in one request.

    ``vm_type`` is the preferred type; a cloud that can fail over takes the
    ``alternatives`` (best first) and the markets of ``spot_policy`` too.
    """

    role: str
    vm_type: str
    user_data: str
    count: int
    tags: dict[str, str] = field(default_factory=dict)
    alternatives: tuple[str, ...] = ()
    spot_policy: SpotPolicy = "on-demand"
    #: Identifies the request, e.g. to stop asking for what it still lacks.
    batch: str = ""

    @property
    def candidates(self) -> list[str]:
        """Every type this request may use, best first."""
        return [self.vm_type, *(t for t in self.alternatives if t != self.vm_type)]


@dataclass(frozen=True)
class Machine:
    """One VM as the provider reports it."""

    id: str
    launch_index: int
    state: str
    vm_type: str
    private_ip: str | None = None
    public_ip: str | None = None
    zone: str | None = None
    market: Market = "on-demand"
    state_reason: str | None = None
    tags: dict[str, str] = field(default_factory=dict)
    #: When it was launched (``time.time()`` seconds), where the provider says.
    launched_at: float | None = None

    @property
    def address(self) -> str | None:
        """The address a client outside the cloud's network reaches it at."""
        return self.public_ip or self.private_ip


@dataclass(frozen=True)
class WorkerSize:
    """What one worker of a machine type has to itself: CPUs and memory (bytes)."""

    cpus: int
    memory: int


LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


#: Called with the machines a request got after it returned (capacity found later).
OnLate = Callable[[list[Machine]], None]
#: Called once a request stopped asking for what it still lacked (its time ran out).
OnGaveUp = Callable[[], None]


@dataclass(frozen=True)
class ImagePythons:
    """What a machine image offers the boot script for the environment's Python.

    Parameters
    ----------
    versions
        ``X.Y`` or ``X.Y.Z`` of the interpreters it has, or can install from its own
        package repositories, without a download from the internet.
    downloads
        Whether its machines can download uv's managed Python (the internet, or
        ``UV_PYTHON_INSTALL_MIRROR``).
    where
        The image, for messages.
    fix
        What to do when neither gives the client's Python.
    """

    versions: tuple[str, ...]
    downloads: bool
    where: str
    fix: str = ""


class Provider(abc.ABC):
    """A source of machines for one cluster.

    The methods come in groups: lifecycle (:meth:`from_options`, :meth:`start`,
    :meth:`close`); choosing machines (:meth:`preflight`, :meth:`choose`,
    :meth:`target_for`, :meth:`worker_size`, :meth:`boot_prelude`); machines (:meth:`launch`,
    :meth:`stop_asking`, :meth:`terminate`, :meth:`describe`, :meth:`live_machines`,
    :meth:`cleanup`, :meth:`cleanup_blocking`); files for the machines (:meth:`store`,
    :meth:`store_bytes`, :meth:`fetch`, :meth:`url_for`, :meth:`artifact_urls`); limits and
    prices (:attr:`capacity`, :meth:`check_capacity`, :meth:`hourly_price`,
    :meth:`hourly_costs`); diagnostics
    (:meth:`console_output`).
    """

    #: Whether machines learn their worker name from a map written after launch
    #: (clouds whose launch order says nothing about which machine is which), rather
    #: than from their launch index.
    names_after_launch: bool = False
    #: Where a scheduler running in the client's process listens for this provider's
    #: machines: every interface (machines in the cloud's network reach it there).
    in_process_scheduler_host: str = "0.0.0.0"

    # -- lifecycle -----------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def from_options(cls, options: ClusterOptions, cluster: str) -> Self:
        """The provider of the cluster named ``cluster``, as its options describe it.

        Cheap and local: nothing is contacted before :meth:`start`.
        """

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and check what can be checked before anything is created."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections (not machines)."""

    def check_outlives_client(self) -> None:
        """Raise an OptionError if the machines cannot outlive this process, which a
        cluster left running (``shutdown_on_close=False``) needs; they can by default."""
        return None

    # -- choosing machines ------------------------------------------------------------
    @abc.abstractmethod
    async def preflight(self, roles: dict[str, str]) -> None:
        """Check every machine choice (``role -> vm_type``) before anything is created."""

    async def choose(self, names: list[str] | None = None, needs: Needs | None = None) -> list[str]:
        """The machine types to use, best first: ``names`` checked, or the best for ``needs``."""
        raise ProviderError(
            f"{type(self).__name__} has no catalog of machine types: worker_cpu, worker_memory, "
            "worker_gpu and arm choose cloud VMs"
        )

    @abc.abstractmethod
    def target_for(self, vm_type: str) -> Target:
        """The platform an environment must be built for to run on ``vm_type``."""

    def image_pythons(self, vm_type: str) -> ImagePythons | None:
        """The Pythons a machine of ``vm_type`` has without a download, and whether it can
        download one (uv's managed Python); None when unknown (then nothing is checked)."""
        return None

    def worker_size(self, vm_type: str) -> WorkerSize | None:
        """CPUs and memory one worker on ``vm_type`` has, once :meth:`preflight` checked
        it; None where the provider cannot tell (the worker then sizes itself)."""
        return None

    def boot_prelude(self) -> str:
        """The metadata prelude of this provider's boot scripts: how a machine learns who it is.

        Machines told in variables by default
        (:data:`dask_rawvm.environment.bootstrap.IDENTITY_FROM_VARIABLES`).
        """
        return IDENTITY_FROM_VARIABLES

    # -- machines ---------------------------------------------------------------------
    @abc.abstractmethod
    async def launch(
        self,
        spec: LaunchSpec,
        on_late: OnLate | None = None,
        on_gave_up: OnGaveUp | None = None,
    ) -> list[Machine]:
        """Ask for ``spec.count`` machines; return them once the cloud accepted the request.

        A cloud short of capacity may return fewer. With ``on_late``, it keeps asking
        for the rest in the background, hands each batch that lands to ``on_late``,
        and calls ``on_gave_up`` (from the event loop, after this returned) once it
        stops asking with machines still missing; without, it keeps asking before it
        returns, for as long as it is configured to.
        """

    def stop_asking(self, batch: str) -> None:
        """Stop asking in the background for what the request ``batch`` still lacks."""
        return None  # providers that never ask in the background have nothing to stop

    @abc.abstractmethod
    async def terminate(self, ids: list[str]) -> None:
        """Terminate machines, in as few calls as the cloud allows."""

    @abc.abstractmethod
    async def describe(self, ids: list[str]) -> list[Machine]:
        """Current state of some machines."""

    @abc.abstractmethod
    async def live_machines(self, cluster: str) -> list[Machine]:
        """Every machine tagged with ``cluster`` that is not terminated."""

    @abc.abstractmethod
    async def cleanup(self, cluster: str) -> list[str]:
        """Remove everything of ``cluster`` (machines first); return the machines' ids."""

    @abc.abstractmethod
    def cleanup_blocking(self) -> list[str]:
        """:meth:`cleanup` of this provider's cluster from synchronous code with no event loop.

        For an unclosed cluster at garbage collection or interpreter exit, when the
        cluster's event loop may be gone and executors refuse new work: terminate the
        machines (the rest can wait for ``dask-rawvm down``); return their ids.
        """

    # -- files for the machines ---------------------------------------------------------
    @abc.abstractmethod
    async def store(self, key: str, path: str) -> None:
        """Keep a file (an environment bundle) where this provider's machines can fetch it."""

    async def store_bytes(self, key: str, data: bytes) -> None:
        """:meth:`store` for something small held in memory."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "content")
            with open(path, "wb") as f:
                f.write(data)
            await self.store(key, path)

    @abc.abstractmethod
    async def fetch(self, key: str) -> bytes:
        """What :meth:`store` kept under ``key`` for this cluster, by any earlier client."""

    @abc.abstractmethod
    async def url_for(self, key: str, expires: int = 3600) -> str:
        """An expiring URL a machine fetches a stored file from."""

    async def upload_form(self, prefix: str, max_bytes: int, expires: int) -> str | None:
        """What a machine needs to upload one file of at most ``max_bytes`` under ``prefix``
        of this cluster's storage, without credentials: the URL on the first line, then
        ``name=value`` form fields (a multipart POST, the file last, its key a form field
        ``key=<prefix>...``), valid ``expires`` seconds. None where machines cannot upload
        (their logs stay where they are: an SSH host's cache).
        """
        return None

    async def artifact_urls(self, key: str, expires: int = 3600) -> ArtifactURLs | None:
        """Expiring URLs of the environment artifact ``key`` in a store this provider's
        machines share across clusters (:mod:`dask_rawvm.environment.artifact`); None when
        it keeps none (each machine then installs the environment itself)."""
        return None

    # -- data: the machines' identity and where their data is -----------------------------
    async def forward_credentials(self, lifetime: float) -> ForwardedCredentials | None:
        """This client's identity as short-lived credentials for the machines (lasting about
        ``lifetime`` seconds); None where the provider has no identity to give (SSH hosts).
        """
        return None

    @property
    def storage_options(self) -> dict[str, object]:
        """fsspec/s3fs ``storage_options`` for this client to reach the S3 the machines
        reach (the local cloud's own); empty where it is AWS's, reached the default way."""
        return {}

    async def bucket_region(self, bucket: str) -> str | None:
        """The region of an S3 bucket; None where unknown (no access, no S3)."""
        return None

    # -- limits and prices ----------------------------------------------------------------
    @property
    def capacity(self) -> float:
        """Most workers this provider can run at once (clouds: their quotas decide)."""
        return math.inf

    def check_capacity(self, workers: int) -> None:
        """Raise a ProviderError, naming the limit and the fix, if ``workers`` cannot run."""
        if workers > self.capacity:
            raise ProviderError(
                f"asked for {workers} workers; this provider runs at most "
                f"{self.capacity:g}: ask for fewer"
            )

    def hourly_price(self, vm_type: str, market: Market) -> float:
        """USD per hour of a machine; 0.0 where nobody bills for it (machines you own)."""
        return 0.0

    def price_source(self, vm_type: str, market: Market) -> str:
        """Where :meth:`hourly_price` comes from, in words (for estimates that say it)."""
        return "machines you own: nobody bills for them"

    def hourly_costs(self, vm_type: str, market: Market, role: str) -> dict[str, float]:
        """USD per hour of one machine of ``role``, by what the cloud bills for it:
        ``{"instance": ..., "storage": ..., "public_ipv4": ...}`` (the instance only here)."""
        return {"instance": self.hourly_price(vm_type, market)}

    # -- diagnostics ----------------------------------------------------------------------
    async def console_output(self, machine_id: str) -> str:
        """What the machine's boot printed, where the provider can tell."""
        return ""
