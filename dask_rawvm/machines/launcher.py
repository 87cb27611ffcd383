"""Launching and naming: every VM of a cluster asked for in as few calls as the cloud allows.

SpecCluster starts (and closes) every worker of one ``_correct_state`` pass
concurrently. Each :class:`~dask_rawvm.machines.processes.WorkerVM` hands its request
to the cluster's :class:`Launcher`, whose :class:`Coalescer` collects the requests of a
short window and sends them as one launch call (and one terminate call), however many
workers there are. A cloud whose launch order says nothing about which machine is which
(an EC2 fleet) gets a map ``instance-id name`` written after it answered; the VMs find
their names there.

``launch_worker`` returns once the cloud accepted the request, not when the Dask worker
connects: a VM takes tens of seconds to boot, and the cluster should not block on it.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, Generic, TypeVar

from dask_rawvm.environment import bootstrap
from dask_rawvm.errors import ProviderError
from dask_rawvm.machines.ledger import Ledger
from dask_rawvm.machines.names import WORKER_PREFIX, contiguous_runs, worker_index
from dask_rawvm.machines.session import ProviderSession
from dask_rawvm.machines.settings import Settings
from dask_rawvm.machines.shape import WorkerShape
from dask_rawvm.machines.store import ClusterStore
from dask_rawvm.needs import SpotPolicy
from dask_rawvm.providers.base import ROLE_TAG, LaunchSpec, Machine, OnGaveUp, OnLate

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: What a worker's launch gives: its machine, or None while the cloud is short of capacity.
Assignment = Machine | None
#: One worker to launch: its name, its scheduler's address, and its threads and memory.
WorkerRequest = tuple[str, str, WorkerShape | None]


class Coalescer(Generic[K, V]):
    """Turn the calls made within ``window`` seconds into one call of ``flush``.

    ``flush`` takes the batch of keys and returns a result (or an exception)
    for each key; each caller gets its own.
    """

    def __init__(
        self, flush: Callable[[list[K]], Awaitable[dict[K, V | BaseException]]], window: float
    ) -> None:
        self._flush = flush
        self.window = window
        self._pending: dict[K, asyncio.Future[V]] = {}
        self._task: asyncio.Task[None] | None = None

    async def submit(self, key: K) -> V:
        future = self._pending.get(key)
        if future is None:
            future = asyncio.get_running_loop().create_future()
            self._pending[key] = future
        if self._task is None:
            self._task = asyncio.create_task(self._drain())
        return await asyncio.shield(future)

    async def _drain(self) -> None:
        # Waiting out the window is the point: it is what makes one call of many.
        await asyncio.sleep(self.window)
        batch, self._pending, self._task = self._pending, {}, None
        try:
            results = await self._flush(list(batch))
        except Exception as e:
            results = dict.fromkeys(batch, e)
        for key, future in batch.items():
            result = results.get(key, KeyError(key))
            if isinstance(result, BaseException):
                future.set_exception(result)
            else:
                future.set_result(result)


class Launcher:
    """Launches a cluster's scheduler and workers, names them, and terminates them.

    Parameters
    ----------
    cluster
        The cluster's name.
    settings
        The cluster's options.
    session
        The cluster's provider.
    store
        Where the VMs' environment, TLS material and name maps are.
    ledger
        Where launches, names and terminations are recorded.
    on_gave_up
        Called with the names of workers the cloud found no capacity for before it
        stopped asking (``capacity_retry_timeout``).
    """

    def __init__(
        self,
        cluster: str,
        settings: Settings,
        session: ProviderSession,
        store: ClusterStore,
        ledger: Ledger,
        on_gave_up: Callable[[list[str]], None],
    ) -> None:
        self.cluster = cluster
        self.settings = settings
        self.session = session
        self.store = store
        self.ledger = ledger
        self.on_gave_up = on_gave_up
        #: Workers whose launch found no capacity yet: the request (batch) still asking.
        self.waiting: dict[str, str] = {}
        self._named: dict[str, dict[str, str]] = {}  # batch -> {machine id: worker name}
        self._on_demand_replacements = 0  # lost spot workers, replaced on-demand
        self._tasks: set[asyncio.Future[Any]] = set()
        window = settings.options.launch_window
        self._launches: Coalescer[WorkerRequest, Assignment] = Coalescer(
            self._launch_workers, window
        )
        self._terminations: Coalescer[str, None] = Coalescer(self._terminate, window)

    # -- user-data -------------------------------------------------------------------------
    async def scheduler_user_data(self) -> str:
        """The boot script of the scheduler VM."""
        return bootstrap.scheduler_script(
            self.cluster,
            self.settings.options.idle_timeout,
            await self.store.environment("scheduler"),
            secrets_url=await self.store.secrets_url("scheduler"),
            metadata=self.session.provider.boot_prelude(),
            config_url=await self.store.config_url(),
            log_url=await self.store.log_upload_url(),
            credentials_endpoint=self.settings.forwards_credentials,
        )

    async def worker_user_data(
        self,
        scheduler_address: str,
        names: list[str],
        names_url: str | None = None,
        shape: WorkerShape | None = None,
    ) -> str:
        """User-data for the workers of one launch request.

        With ``names_url`` each VM finds its name in the map stored there once the
        cloud answered; without, the names must be consecutive (by launch index).
        The workers start with ``shape``'s threads and memory limit (the spec's), or
        the options' when None.
        """
        options = self.settings.options
        nthreads = options.worker_nthreads
        memory_limit = options.worker_memory_limit
        if shape is not None:
            nthreads = shape.nthreads
            if shape.memory_limit is not None:
                memory_limit = str(shape.memory_limit)
        return bootstrap.worker_script(
            self.cluster,
            scheduler_address,
            name_prefix=WORKER_PREFIX,
            first_index=worker_index(names[0]),
            death_timeout=options.death_timeout,
            nthreads=nthreads,
            memory_limit=memory_limit,
            environment=await self.store.environment("worker"),
            names_url=names_url,
            secrets_url=await self.store.secrets_url("worker"),
            metadata=self.session.provider.boot_prelude(),
            config_url=await self.store.config_url(),
            log_url=await self.store.log_upload_url(),
            credentials_endpoint=self.settings.forwards_credentials,
        )

    # -- the scheduler -----------------------------------------------------------------------
    async def launch_scheduler(self) -> Machine:
        """Launch the scheduler VM (on-demand), waiting for capacity as long as allowed."""
        options = self.settings.options
        spec = LaunchSpec(
            role="scheduler",
            vm_type=options.scheduler_vm_type,
            user_data=await self.scheduler_user_data(),
            count=1,
            tags=options.tags,
            batch=uuid.uuid4().hex[:12],
        )
        machines = await self._launch(spec)
        if not machines:
            raise ProviderError(
                f"no capacity for the scheduler VM ({options.scheduler_vm_type}) in any zone "
                f"within capacity_retry_timeout={options.capacity_retry_timeout:.0f} s: try "
                "another scheduler_vm_type or zone, or scheduler='local'"
            )
        return machines[0]

    # -- workers ---------------------------------------------------------------------------
    async def launch_worker(
        self, name: str, scheduler_address: str, shape: WorkerShape | None = None
    ) -> Assignment:
        """Launch the VM of one worker (batched with the others of this pass) whose worker
        has ``shape``'s threads and memory.

        None when the cloud had no capacity for it yet: it is asked for in the background.
        """
        return await self._launches.submit((name, scheduler_address, shape))

    def replace_lost(self, name: str) -> None:
        """The worker ``name`` lost its VM: if the cloud took back a spot VM, the next
        replacement goes on-demand where the policy falls back (that capacity is gone)."""
        machine = self.ledger.machine_of(name)
        if machine is not None and machine.market == "spot":
            self._on_demand_replacements += 1

    def cancel(self, name: str) -> None:
        """Stop waiting for the machine of a worker that is no longer wanted."""
        batch = self.waiting.pop(name, None)
        if batch is not None and not self._waiting_for(batch) and self.session.is_open:
            self.session.provider.stop_asking(batch)

    async def _launch_workers(
        self, requests: list[WorkerRequest]
    ) -> dict[WorkerRequest, Assignment | BaseException]:
        # One user-data per scheduler and shape: workers of one request boot alike.
        alike: dict[tuple[str, WorkerShape | None], list[str]] = {}
        for name, address, shape in requests:
            alike.setdefault((address, shape), []).append(name)
        groups = [
            (address, shape, group, policy)
            for (address, shape), names in alike.items()
            for group in self._groups(names)
            for group, policy in self._by_market(group)
        ]
        outcomes = await asyncio.gather(
            *(
                self._launch_named(address, group, policy, shape)
                for address, shape, group, policy in groups
            ),
            return_exceptions=True,
        )
        results: dict[WorkerRequest, Assignment | BaseException] = {}
        for (address, shape, group, _), outcome in zip(groups, outcomes, strict=True):
            for name in group:
                results[name, address, shape] = (
                    outcome if isinstance(outcome, BaseException) else outcome[name]
                )
        return results

    def _groups(self, names: list[str]) -> list[list[str]]:
        """Names launched in one request: all of them, or runs of consecutive names for a
        provider that names machines by launch index."""
        if self.session.provider.names_after_launch:
            return [sorted(names, key=worker_index)]
        return contiguous_runs(names)

    def _by_market(self, names: list[str]) -> list[tuple[list[str], SpotPolicy]]:
        """Replacements of lost spot workers go on-demand first, where the policy allows."""
        policy = self.settings.options.spot_policy
        on_demand = 0
        if policy == "spot_with_fallback":
            on_demand = min(self._on_demand_replacements, len(names))
        self._on_demand_replacements -= on_demand
        split: list[tuple[list[str], SpotPolicy]] = [
            (names[:on_demand], "on-demand"),
            (names[on_demand:], policy),
        ]
        return [(group, market) for group, market in split if group]

    async def _launch_named(
        self,
        scheduler_address: str,
        names: list[str],
        spot_policy: SpotPolicy,
        shape: WorkerShape | None = None,
    ) -> dict[str, Assignment]:
        options = self.settings.options
        provider = self.session.provider
        batch = uuid.uuid4().hex[:12]
        names_url = None
        if provider.names_after_launch:
            # Valid for as long as a VM may land and boot.
            expires = int(options.capacity_retry_timeout) + 3600
            names_url = await self.store.names_url(batch, expires)
        spec = LaunchSpec(
            role="worker",
            vm_type=options.worker_vm_type,
            user_data=await self.worker_user_data(scheduler_address, names, names_url, shape),
            count=len(names),
            tags=options.tags,
            alternatives=tuple(options.worker_vm_types or ()),
            spot_policy=spot_policy,
            batch=batch,
        )
        late = provider.names_after_launch
        on_late: OnLate | None = partial(self._landed_late, batch) if late else None
        on_gave_up: OnGaveUp | None = partial(self._give_up, batch) if late else None
        machines = await self._launch(spec, on_late, on_gave_up)
        if not late and len(machines) != len(names):
            raise ProviderError(
                f"asked for {len(names)} worker VMs, the cloud started {len(machines)}"
            )
        # Before any await: the provider gives up (on_gave_up) only after this returned.
        self._named[batch] = {}
        self._assign(batch, names, machines)
        self.waiting.update(dict.fromkeys(names[len(machines) :], batch))
        if names_url is not None:
            await self.store.write_names(batch, self._named[batch])
        return {name: self.ledger.machine_of(name) for name in names}

    def _assign(self, batch: str, names: list[str], machines: list[Machine]) -> None:
        for name, machine in zip(names, machines, strict=False):
            self.ledger.assign(name, machine)
            self.waiting.pop(name, None)
            self._named[batch][machine.id] = name

    def _landed_late(self, batch: str, machines: list[Machine]) -> None:
        """Machines a request got after it returned: named for the workers still waiting."""
        waiting = self._waiting_for(batch)
        self._record_launched(machines)
        self._assign(batch, waiting, machines)
        unwanted = [m.id for m in machines[len(waiting) :]]  # their workers were cancelled
        logger.info(
            "%d late worker VM(s) landed; %d no longer wanted", len(machines), len(unwanted)
        )
        self._spawn(self._after_late(batch, unwanted))

    async def _after_late(self, batch: str, unwanted: list[str]) -> None:
        await self.store.write_names(batch, self._named[batch])
        if unwanted:
            await self._terminate(unwanted)
        if not self._waiting_for(batch) and self.session.is_open:
            self.session.provider.stop_asking(batch)

    def _give_up(self, batch: str) -> None:
        """The provider stopped asking for what ``batch`` lacks: the cluster goes without."""
        names = self._waiting_for(batch)
        for name in names:
            del self.waiting[name]
        if names:
            logger.warning(
                "no capacity for workers %s within capacity_retry_timeout: going without",
                names,
            )
            self.on_gave_up(names)

    def _waiting_for(self, batch: str) -> list[str]:
        """The workers the request ``batch`` still owes a machine."""
        return [name for name, b in self.waiting.items() if b == batch]

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(
        self, spec: LaunchSpec, on_late: OnLate | None = None, on_gave_up: OnGaveUp | None = None
    ) -> list[Machine]:
        machines = await self.session.provider.launch(spec, on_late, on_gave_up)
        self._record_launched(machines)
        logger.info(
            "launched %d of %d %s VM(s): %s",
            len(machines),
            spec.count,
            spec.role,
            ", ".join(sorted({f"{m.vm_type} {m.market}" for m in machines})) or "none",
        )
        return machines

    def _record_launched(self, machines: list[Machine]) -> None:
        provider = self.session.provider
        self.ledger.launched(
            machines,
            lambda m: provider.hourly_costs(m.vm_type, m.market, m.tags.get(ROLE_TAG, "worker")),
        )

    # -- terminating -----------------------------------------------------------------------
    async def terminate(self, machine_id: str) -> None:
        """Terminate one VM (batched with the others of this pass); nothing once closed."""
        if self.session.is_open:
            await self._terminations.submit(machine_id)

    async def _terminate(self, ids: list[str]) -> dict[str, BaseException | None]:
        await self.session.provider.terminate(ids)
        self.ledger.terminated(ids)
        return dict.fromkeys(ids)
