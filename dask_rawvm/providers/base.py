"""What every provider offers: launch N machines of a spec, terminate, describe, clean up.

Providers know clouds, not Dask: the cluster hands them a :class:`LaunchSpec`
(role, type, user-data, tags, count) and gets :class:`Machine` records back.
"""

from __future__ import annotations

import abc
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from dask_rawvm.catalog import Needs
    from dask_rawvm.environment.target import Target

#: The tag every resource of a cluster carries: its value is the cluster's name.
CLUSTER_TAG = "dask-rawvm:cluster"
#: "scheduler" or "worker".
ROLE_TAG = "dask-rawvm:role"


class ProviderError(RuntimeError):
    """The cloud refused or failed a request; the message names the call and the cause."""


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
    spot_policy: str = "on-demand"
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
    market: str = "on-demand"
    state_reason: str | None = None
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def address(self) -> str | None:
        """The address a client outside the cloud's network reaches it at."""
        return self.public_ip or self.private_ip


LIVE_STATES = ("pending", "running", "stopping", "stopped", "shutting-down")


#: Called with the machines a request got after it returned (capacity found later).
OnLate = Callable[[list[Machine]], None]


class Provider(abc.ABC):
    """A source of machines for one cluster."""

    #: Whether machines learn their worker name from a map written after launch
    #: (clouds whose launch order says nothing about which machine is which), rather
    #: than from their launch index.
    names_after_launch: bool = False

    @abc.abstractmethod
    async def start(self) -> None:
        """Connect and check what can be checked before anything is created."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections (not machines)."""

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

    @abc.abstractmethod
    async def launch(self, spec: LaunchSpec, on_late: OnLate | None = None) -> list[Machine]:
        """Ask for ``spec.count`` machines; return them once the cloud accepted the request.

        A cloud short of capacity may return fewer. With ``on_late``, it keeps asking
        for the rest in the background and hands each batch that lands to ``on_late``;
        without, it keeps asking before it returns, for as long as it is configured to.
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
    async def cleanup(self, cluster: str) -> list[str]:
        """Terminate every live machine tagged with ``cluster``; return their ids."""

    async def live_machines(self, cluster: str) -> list[Machine]:
        """Every machine tagged with ``cluster`` that is not terminated."""
        raise NotImplementedError

    async def store(self, key: str, path: str) -> None:
        """Keep a file (an environment bundle) where this provider's machines can fetch it."""
        raise NotImplementedError

    async def store_bytes(self, key: str, data: bytes) -> None:
        """:meth:`store` for something small held in memory."""
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "content")
            with open(path, "wb") as f:
                f.write(data)
            await self.store(key, path)

    async def fetch(self, key: str) -> bytes:
        """What :meth:`store` kept under ``key`` for this cluster, by any earlier client."""
        raise NotImplementedError(f"{type(self).__name__} cannot read back what it stored")

    async def url_for(self, key: str, expires: int = 3600) -> str:
        """An expiring URL a machine fetches a stored file from."""
        raise NotImplementedError

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

    def hourly_price(self, vm_type: str, market: str) -> float:
        """USD per hour of a machine; 0.0 where nobody bills for it (machines you own)."""
        return 0.0

    async def console_output(self, machine_id: str) -> str:
        """What the machine's boot printed, where the provider can tell."""
        return ""
