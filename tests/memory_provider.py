"""An in-memory provider: launches hand out Machine records, nothing runs, every call counted.

The way distributed tests ProcessInterface and dask-cloudprovider tests VMCluster: the
launching and naming logic runs for real against a provider that is only bookkeeping.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

from dask_rawvm.config import ClusterOptions, resolve_options
from dask_rawvm.environment import Target
from dask_rawvm.errors import ProviderError
from dask_rawvm.machines import (
    BootWatch,
    ClusterStore,
    Launcher,
    Ledger,
    ProviderSession,
    Settings,
)
from dask_rawvm.providers.base import (
    CLUSTER_TAG,
    LIVE_STATES,
    ROLE_TAG,
    LaunchSpec,
    Machine,
    OnGaveUp,
    OnLate,
    Provider,
    WorkerSize,
)


@dataclass
class Asking:
    """A request still asking in the background: what it lacks, and whom to tell."""

    spec: LaunchSpec
    missing: int
    on_late: OnLate
    on_gave_up: OnGaveUp | None


class MemoryProvider(Provider):
    """Machines as records: ``capacity_now`` of them can launch now, the rest on request.

    ``names_after_launch`` like an EC2 fleet, or by launch index (``False``) like SSH.
    """

    def __init__(self, cluster: str = "mem", names_after_launch: bool = True) -> None:
        self.cluster = cluster
        self.names_after_launch = names_after_launch
        self.calls: Counter[str] = Counter()
        self.launches: list[LaunchSpec] = []
        self.machines: dict[str, Machine] = {}
        self.files: dict[str, bytes] = {}
        self.capacity_now = math.inf
        self.asking: dict[str, Asking] = {}
        self.stopped: list[str] = []
        self.fail_cleanup = False
        #: What a worker of each type has: types not here cannot be sized.
        self.sizes: dict[str, WorkerSize] = {}
        self._ids = itertools.count()

    @classmethod
    def from_options(cls, options: ClusterOptions, cluster: str) -> MemoryProvider:
        return cls(cluster)

    async def start(self) -> None:
        self.calls["start"] += 1

    async def close(self) -> None:
        self.calls["close"] += 1

    async def preflight(self, roles: dict[str, str]) -> None:
        self.calls["preflight"] += 1

    def target_for(self, vm_type: str) -> Target:
        return Target.local()

    def worker_size(self, vm_type: str) -> WorkerSize | None:
        return self.sizes.get(vm_type)

    async def launch(
        self, spec: LaunchSpec, on_late: OnLate | None = None, on_gave_up: OnGaveUp | None = None
    ) -> list[Machine]:
        self.calls["launch"] += 1
        self.launches.append(spec)
        count = int(min(spec.count, self.capacity_now))
        self.capacity_now -= count
        machines = self._make(spec, count)
        if count < spec.count and on_late is not None:
            self.asking[spec.batch] = Asking(spec, spec.count - count, on_late, on_gave_up)
        return machines

    def _make(self, spec: LaunchSpec, count: int) -> list[Machine]:
        market = "spot" if spec.spot_policy != "on-demand" else "on-demand"
        machines = [
            Machine(
                id=f"m-{next(self._ids)}",
                launch_index=i,
                state="pending",
                vm_type=spec.vm_type,
                market=market,
                tags={**spec.tags, CLUSTER_TAG: self.cluster, ROLE_TAG: spec.role},
            )
            for i in range(count)
        ]
        self.machines.update((m.id, m) for m in machines)
        return machines

    def land(self, batch: str, count: int) -> list[Machine]:
        """Capacity found later: ``count`` machines of a request that is still asking."""
        asking = self.asking[batch]
        machines = self._make(asking.spec, min(count, asking.missing))
        asking.missing -= len(machines)
        asking.on_late(machines)
        return machines

    def give_up(self, batch: str) -> None:
        """The request's time ran out."""
        asking = self.asking.pop(batch)
        if asking.on_gave_up is not None:
            asking.on_gave_up()

    def stop_asking(self, batch: str) -> None:
        self.stopped.append(batch)
        self.asking.pop(batch, None)

    async def terminate(self, ids: list[str]) -> None:
        self.calls["terminate"] += 1
        for machine_id in ids:
            self.machines[machine_id] = replace(self.machines[machine_id], state="terminated")

    async def describe(self, ids: list[str]) -> list[Machine]:
        self.calls["describe"] += 1
        return [self.machines[i] for i in ids]

    async def live_machines(self, cluster: str) -> list[Machine]:
        return [
            m
            for m in self.machines.values()
            if m.state in LIVE_STATES and m.tags.get(CLUSTER_TAG) == cluster
        ]

    async def cleanup(self, cluster: str) -> list[str]:
        self.calls["cleanup"] += 1
        if self.fail_cleanup:
            raise ProviderError("the cloud is down", code="Unavailable")
        ids = [m.id for m in await self.live_machines(cluster)]
        await self.terminate(ids)
        return ids

    def cleanup_blocking(self) -> list[str]:
        self.calls["cleanup_blocking"] += 1
        ids = [m.id for m in self.machines.values() if m.state in LIVE_STATES]
        for machine_id in ids:
            self.machines[machine_id] = replace(self.machines[machine_id], state="terminated")
        return ids

    async def store(self, key: str, path: str) -> None:
        with open(path, "rb") as f:
            self.files[key] = f.read()

    async def fetch(self, key: str) -> bytes:
        return self.files[key]

    async def url_for(self, key: str, expires: int = 3600) -> str:
        return f"memory://{key}"


@dataclass
class Parts:
    """A cluster's machine-side parts over a :class:`MemoryProvider`, as RawVMCluster wires them."""

    provider: MemoryProvider
    settings: Settings
    session: ProviderSession
    ledger: Ledger
    store: ClusterStore
    launcher: Launcher
    watch: BootWatch
    gave_up: list[list[str]] = field(default_factory=list)


def make_parts(names_after_launch: bool = True, **options: Any) -> Parts:
    provider = MemoryProvider("mem", names_after_launch)
    settings = Settings(resolve_options("aws", environment=None, tls=False, **options))
    ledger = Ledger()
    session = ProviderSession(provider, "mem", ledger)
    store = ClusterStore("mem", session)
    gave_up: list[list[str]] = []
    launcher = Launcher("mem", settings, session, store, ledger, on_gave_up=gave_up.append)
    return Parts(
        provider, settings, session, ledger, store, launcher, BootWatch(session, ledger), gave_up
    )
