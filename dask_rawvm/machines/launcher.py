"""The scheduler VM and worker VMs as ``ProcessInterface`` objects, and the pool behind them.

SpecCluster starts (and closes) every worker of one ``_correct_state`` pass
concurrently. Each :class:`WorkerVM` hands its request to the cluster's
:class:`VMPool`, whose :class:`Coalescer` collects the requests of a short
window and sends them as one launch call (and one terminate call), however many
workers there are.

``start()`` returns once the cloud accepted the request, not when the Dask
worker connects: a VM takes tens of seconds to boot, and the cluster should not
block on it (``client.wait_for_workers(n)`` does that where a user wants it).
"""

from __future__ import annotations

import asyncio
import logging
import re
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Hashable
from functools import partial
from typing import Any, Generic, TypeVar, cast

from distributed.core import Status, rpc
from distributed.deploy.spec import ProcessInterface

from dask_rawvm.config import ClusterOptions
from dask_rawvm.cost import CostMeter
from dask_rawvm.environment import Bundle, Target, bootstrap, prepare_environment
from dask_rawvm.environment.bootstrap import EnvironmentRef
from dask_rawvm.environment.lock import Resolver
from dask_rawvm.providers.base import ROLE_TAG, LaunchSpec, Machine, Provider, ProviderError
from dask_rawvm.security import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    ClusterTLS,
    pack_vm_material,
    security_from_material,
    unpack_vm_material,
)

#: What a worker's launch gives: its machine, or None while the cloud is short of capacity.
Assignment = Machine | None

logger = logging.getLogger(__name__)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

WORKER_PREFIX = "worker-"


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


def worker_index(name: str) -> int:
    """The number in a worker name: ``worker-12`` -> 12."""
    match = re.fullmatch(re.escape(WORKER_PREFIX) + r"(\d+)", name)
    if match is None:
        raise ValueError(f"not a dask-rawvm worker name: {name!r}")
    return int(match.group(1))


def contiguous_runs(names: list[str]) -> list[list[str]]:
    """Split worker names into runs of consecutive numbers (one launch call each)."""
    runs: list[list[str]] = []
    for name in sorted(names, key=worker_index):
        if runs and worker_index(name) == worker_index(runs[-1][-1]) + 1:
            runs[-1].append(name)
        else:
            runs.append([name])
    return runs


class VMPool:
    """Every VM of one cluster: batched launches and terminations, and the record of both.

    Parameters
    ----------
    cluster
        The cluster's name.
    options
        The cluster's resolved options.
    """

    def __init__(self, cluster: str, options: ClusterOptions) -> None:
        self.cluster = cluster
        self.options = options
        self.provider: Provider | None = None
        self.machines: dict[str, Machine] = {}  # every instance this pool launched, by id
        self.terminated: set[str] = set()
        self.assigned: dict[str, Machine] = {}  # each worker's machine, by worker name
        # Workers whose launch found no capacity yet: the request (batch) still asking.
        self.waiting: dict[str, str] = {}
        self._named: dict[str, dict[str, str]] = {}  # batch -> {instance id: worker name}
        # Workers the cluster gave up waiting for (capacity_retry_timeout passed).
        self.on_gave_up: Callable[[list[str]], None] = lambda names: None
        # Spot workers lost, whose replacements go on-demand (spot_with_fallback).
        self.replace_on_demand = 0
        self._tasks: set[asyncio.Future[Any]] = set()
        self.bundles: dict[str, Bundle] = {}  # the environment of each role's VMs
        self.adopted_scheduler: Machine | None = None  # when reconnecting to a running cluster
        self.adopted_workers: list[Machine] = []
        self.meter = CostMeter()  # what the VMs cost so far, and per hour now
        self.report: Callable[..., None] = lambda **fields: None  # progress display
        # Mutual TLS with a CA of the cluster's own, when options.tls: what the client
        # presents (Security), and the stored key and certificates of each VM role.
        self.security: Any = None
        self.scheduler_security: Any = None  # for a scheduler in this process
        self._secrets: dict[str, str] = {}
        self._launches: Coalescer[tuple[str, str], Assignment] = Coalescer(
            self._launch_workers, options.launch_window
        )
        self._terminations: Coalescer[str, None] = Coalescer(self._terminate, options.launch_window)

    def _provider(self) -> Provider:
        if self.provider is None:
            raise RuntimeError("the cluster's provider is not started")
        return self.provider

    # -- environment -----------------------------------------------------------------
    async def prepare_environments(self, targets: dict[str, Target]) -> None:
        """Lock and bundle the user's environment for each role's platform, and store it.

        Runs before anything is launched, so an environment that cannot be built
        for the VMs is an error that costs nothing.
        """
        options = self.options
        for role, target in targets.items():
            bundle = await asyncio.to_thread(
                partial(
                    prepare_environment,
                    options.environment,
                    target,
                    options.environment_ignore,
                    resolver=cast(Resolver, options.environment_resolver),
                )
            )
            if bundle.digest not in {b.digest for b in self.bundles.values()}:
                with tempfile.TemporaryDirectory() as tmp:
                    archive = await asyncio.to_thread(bundle.write_archive, tmp)
                    await self._provider().store(self._bundle_key(bundle), str(archive))
            self.bundles[role] = bundle
            lock = "cached lock" if bundle.lock.from_cache else "resolved"
            logger.info("environment for %s VMs: %s (%s)", role, bundle.digest[:12], lock)

    @staticmethod
    def _bundle_key(bundle: Bundle) -> str:
        return f"environments/{bundle.digest}.tar.gz"

    async def _environment(self, role: str) -> EnvironmentRef | None:
        bundle = self.bundles.get(role)
        if bundle is None:
            return None
        url = await self._provider().url_for(self._bundle_key(bundle))
        return EnvironmentRef(bundle.digest, url)

    # -- TLS --------------------------------------------------------------------------
    @property
    def scheme(self) -> str:
        """The scheme of every Dask address of the cluster."""
        return "tls" if self.options.tls else "tcp"

    async def prepare_tls(self) -> None:
        """A new CA for the cluster; each VM role's key and certificates stored for the VMs
        to fetch (never in user-data), and the client's for a client that reconnects."""
        tls = ClusterTLS.create(self.cluster)
        cert, key = tls.issue("client")
        client = {CA_FILE: tls.ca_cert_pem, CERT_FILE: cert, KEY_FILE: key}
        materials = {role: tls.vm_material(role) for role in ("scheduler", "worker")}
        await self._store_secrets({**materials, "client": client})
        self.security = security_from_material(client)
        self.scheduler_security = security_from_material(materials["scheduler"])

    async def reuse_tls(self) -> None:
        """The TLS material of the running cluster this client reconnects to."""
        provider = self._provider()
        materials = {
            role: unpack_vm_material(await provider.fetch(self._secret_key(role)))
            for role in ("worker", "client")
        }
        await self._store_secrets(materials)  # this client's bucket, for the VMs it launches
        self.security = security_from_material(materials["client"])

    async def _store_secrets(self, materials: dict[str, dict[str, str]]) -> None:
        for role, material in materials.items():
            self._secrets[role] = self._secret_key(role)
            await self._provider().store_bytes(self._secrets[role], pack_vm_material(material))

    @staticmethod
    def _secret_key(role: str) -> str:
        return f"secrets/{role}.tar"

    async def _secrets_url(self, role: str) -> str | None:
        if role not in self._secrets:
            return None
        return await self._provider().url_for(self._secrets[role])

    # -- user-data ---------------------------------------------------------------------
    async def scheduler_user_data(self) -> str:
        return bootstrap.scheduler_script(
            self.cluster,
            self.options.idle_timeout,
            await self._environment("scheduler"),
            secrets_url=await self._secrets_url("scheduler"),
        )

    async def worker_user_data(
        self, scheduler_address: str, names: list[str], names_url: str | None = None
    ) -> str:
        """User-data for the workers of one launch request.

        With ``names_url`` each VM finds its name in the map stored there once the
        cloud answered; without, the names must be consecutive (by launch index).
        """
        options = self.options
        return bootstrap.worker_script(
            self.cluster,
            scheduler_address,
            name_prefix=WORKER_PREFIX,
            first_index=worker_index(names[0]),
            death_timeout=options.death_timeout,
            nthreads=options.worker_nthreads,
            memory_limit=options.worker_memory_limit,
            environment=await self._environment("worker"),
            names_url=names_url,
            secrets_url=await self._secrets_url("worker"),
        )

    # -- reconnecting ------------------------------------------------------------------
    async def find_running(self, provider: Provider) -> None:
        """Look for a running cluster of this name, to reconnect to instead of starting one."""
        machines = [m for m in await provider.live_machines(self.cluster) if m.state != "stopped"]
        schedulers = [m for m in machines if m.tags.get(ROLE_TAG) == "scheduler"]
        if schedulers:
            self.adopted_scheduler = schedulers[0]
            self.adopted_workers = [m for m in machines if m.tags.get(ROLE_TAG) == "worker"]
            self.machines.update((m.id, m) for m in machines)

    # -- launching -----------------------------------------------------------------
    async def launch_scheduler(self) -> Machine:
        if self.adopted_scheduler is not None:
            return self.adopted_scheduler
        options = self.options
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

    async def launch_worker(self, name: str, scheduler_address: str) -> Assignment:
        """Launch the VM of one worker (batched with the others of this pass).

        None when the cloud had no capacity for it yet: it is asked for in the background.
        """
        return await self._launches.submit((name, scheduler_address))

    async def _launch_workers(
        self, requests: list[tuple[str, str]]
    ) -> dict[tuple[str, str], Assignment | BaseException]:
        by_scheduler: dict[str, list[str]] = {}
        for name, address in requests:
            by_scheduler.setdefault(address, []).append(name)
        groups = [
            (address, group, policy)
            for address, names in by_scheduler.items()
            for group in self._groups(names)
            for group, policy in self._by_market(group)
        ]
        outcomes = await asyncio.gather(
            *(self._launch_named(address, group, policy) for address, group, policy in groups),
            return_exceptions=True,
        )
        results: dict[tuple[str, str], Assignment | BaseException] = {}
        for (address, group, _), outcome in zip(groups, outcomes, strict=True):
            for name in group:
                results[name, address] = (
                    outcome if isinstance(outcome, BaseException) else outcome[name]
                )
        return results

    def _groups(self, names: list[str]) -> list[list[str]]:
        """Names launched in one request: all of them, or runs of consecutive names for a
        provider that names machines by launch index."""
        if self._provider().names_after_launch:
            return [sorted(names, key=worker_index)]
        return contiguous_runs(names)

    def _by_market(self, names: list[str]) -> list[tuple[list[str], str]]:
        """Replacements of lost spot workers go on-demand first, where the policy allows."""
        policy = self.options.spot_policy
        on_demand = min(self.replace_on_demand, len(names)) if policy == "spot_with_fallback" else 0
        self.replace_on_demand -= on_demand
        split = [(names[:on_demand], "on-demand"), (names[on_demand:], policy)]
        return [(group, market) for group, market in split if group]

    async def _launch_named(
        self, scheduler_address: str, names: list[str], spot_policy: str
    ) -> dict[str, Assignment]:
        options = self.options
        provider = self._provider()
        batch = uuid.uuid4().hex[:12]
        names_url = None
        if provider.names_after_launch:
            expires = int(options.capacity_retry_timeout) + 3600
            names_url = await provider.url_for(self._names_key(batch), expires=expires)
        spec = LaunchSpec(
            role="worker",
            vm_type=options.worker_vm_type,
            user_data=await self.worker_user_data(scheduler_address, names, names_url),
            count=len(names),
            tags=options.tags,
            alternatives=tuple(options.worker_vm_types or ()),
            spot_policy=spot_policy,
            batch=batch,
        )
        on_late = partial(self._landed_late, batch) if provider.names_after_launch else None
        machines = await self._launch(spec, on_late)
        if on_late is None and len(machines) != len(names):
            raise ProviderError(
                f"asked for {len(names)} worker VMs, the cloud started {len(machines)}"
            )
        self._named[batch] = {}
        self._assign(batch, names, machines)
        missing = names[len(machines) :]
        if missing:
            self.waiting.update(dict.fromkeys(missing, batch))
            loop = asyncio.get_running_loop()
            loop.call_later(options.capacity_retry_timeout + 5, self._give_up, batch)
        if names_url is not None:
            await self._write_names(batch)
        return {name: self.assigned.get(name) for name in names}

    def _assign(self, batch: str, names: list[str], machines: list[Machine]) -> None:
        for name, machine in zip(names, machines, strict=False):
            self.assigned[name] = machine
            self.waiting.pop(name, None)
            self._named[batch][machine.id] = name

    @staticmethod
    def _names_key(batch: str) -> str:
        return f"names/{batch}.txt"

    async def _write_names(self, batch: str) -> None:
        """Store the ``instance-id name`` map the request's VMs find their names in."""
        lines = "".join(f"{i} {n}\n" for i, n in self._named[batch].items())
        await self._provider().store_bytes(self._names_key(batch), lines.encode())

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
        await self._write_names(batch)
        if unwanted:
            await self._terminate(unwanted)
        if not self._waiting_for(batch):
            self._provider().stop_asking(batch)

    def _waiting_for(self, batch: str) -> list[str]:
        """The workers the request ``batch`` still owes a machine."""
        return [name for name, b in self.waiting.items() if b == batch]

    def _give_up(self, batch: str) -> None:
        names = self._waiting_for(batch)
        if self.provider is not None:
            self.provider.stop_asking(batch)
        if names:
            for name in names:
                del self.waiting[name]
            logger.warning(
                "no capacity for workers %s within capacity_retry_timeout: going without",
                names,
            )
            self.on_gave_up(names)

    def cancel(self, name: str) -> None:
        """Stop waiting for the machine of a worker that is no longer wanted."""
        batch = self.waiting.pop(name, None)
        if batch is not None and not self._waiting_for(batch) and self.provider:
            self.provider.stop_asking(batch)

    def _spawn(self, coroutine: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _launch(self, spec: LaunchSpec, on_late: Any = None) -> list[Machine]:
        machines = await self._provider().launch(spec, on_late)
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
        provider = self._provider()
        self.machines.update((m.id, m) for m in machines)
        for m in machines:
            self.meter.launched(
                m.id, m.vm_type, m.market, provider.hourly_price(m.vm_type, m.market)
            )

    # -- terminating ---------------------------------------------------------------
    async def terminate(self, machine_id: str) -> None:
        """Terminate one VM (batched with the others of this pass)."""
        await self._terminations.submit(machine_id)

    async def _terminate(self, ids: list[str]) -> dict[str, BaseException | None]:
        await self._provider().terminate(ids)
        self._record_terminated(ids)
        return dict.fromkeys(ids)

    def _record_terminated(self, ids: list[str]) -> None:
        for machine_id in set(ids) - self.terminated:
            self.terminated.add(machine_id)
            if machine_id in self.meter.running():
                self.meter.terminated(machine_id)

    def live(self) -> list[Machine]:
        """The machines launched and not yet terminated, as last described."""
        return [m for i, m in self.machines.items() if i not in self.terminated]

    async def close(self) -> list[str]:
        """Terminate whatever the cluster still has, by its tag; return those ids."""
        if self.provider is None:
            return []
        try:
            leftovers = await self.provider.cleanup(self.cluster)
            self._record_terminated(leftovers)
            self._record_terminated(list(self.machines))  # everything is gone now
            return leftovers
        finally:
            await self.provider.close()
            self.provider = None

    # -- waiting ---------------------------------------------------------------------
    async def describe(self, machine_id: str) -> Machine:
        (machine,) = await self._provider().describe([machine_id])
        self.machines[machine.id] = machine
        return machine

    async def console_output(self, machine_id: str) -> str:
        return await self._provider().console_output(machine_id)

    async def raise_if_dead(self, machines: list[Machine]) -> list[Machine]:
        """Describe booting VMs; raise, with its boot log, if one has gone."""
        if not machines:
            return []
        described = await self._provider().describe([m.id for m in machines])
        for machine in described:
            if machine.state not in ("pending", "running"):
                raise ProviderError(await self.boot_failure(machine, "a worker VM died at boot"))
        return described

    async def describe_waiting(self, machines: dict[str | None, Machine | None]) -> str:
        """What each VM we are waiting for is doing: its state and last log line."""
        lines = []
        known = {m.id: name for name, m in machines.items() if m is not None}
        for machine in await self._provider().describe(list(known)):
            log = (await self.console_output(machine.id)).strip().splitlines()
            last = log[-1] if log else "(nothing logged yet)"
            lines.append(f"{known[machine.id]} ({machine.id}, {machine.state}): {last}")
        if self.waiting:
            lines.append(f"no capacity yet for {sorted(self.waiting, key=worker_index)}")
        return "still waiting for: " + "; ".join(lines) if lines else "no VM is booting"

    async def boot_failure(self, machine: Machine, what: str) -> str:
        """A message saying what a VM was doing, with the tail of its boot log."""
        try:
            log = await self._provider().console_output(machine.id)
        except ProviderError:
            log = ""
        tail = "\n".join(log.strip().splitlines()[-15:]) or "(no boot log)"
        reason = f" ({machine.state_reason})" if machine.state_reason else ""
        return (
            f"{what}: instance {machine.id} is {machine.state}{reason}. "
            f"Last lines of its boot log:\n{tail}"
        )


class SchedulerVM(ProcessInterface):
    """The Dask scheduler on a VM of its own.

    ``address`` is where the client reaches it (the public address);
    ``contact_address`` is where workers reach it (the private address).
    """

    def __init__(self, pool: VMPool) -> None:
        super().__init__()
        self.pool = pool
        self.machine: Machine | None = None
        self.contact_address: str | None = None

    async def start(self) -> None:
        self.pool.report(stage="launching the scheduler VM")
        self.machine = await self.pool.launch_scheduler()
        self.pool.report(
            stage=f"scheduler VM {self.machine.id} ({self.machine.vm_type}) is booting"
        )
        deadline = time.monotonic() + self.pool.options.scheduler_timeout
        machine = await self._wait_running(deadline)
        port, scheme = bootstrap.SCHEDULER_PORT, self.pool.scheme
        self.address = f"{scheme}://{machine.address}:{port}"
        self.contact_address = f"{scheme}://{machine.private_ip or machine.address}:{port}"
        await self._wait_answering(deadline)
        await super().start()

    async def _wait_running(self, deadline: float) -> Machine:
        assert self.machine is not None
        while True:
            machine = await self.pool.describe(self.machine.id)
            if machine.state == "running" and machine.address:
                return machine
            await self._check(machine, deadline, "the scheduler VM did not reach running")
            await asyncio.sleep(1)

    async def _wait_answering(self, deadline: float) -> None:
        assert self.machine is not None and self.address is not None
        security = self.pool.security
        connection_args = security.get_connection_args("client") if security else {}
        polled = time.monotonic()
        while True:
            try:
                async with rpc(self.address, timeout=2, connection_args=connection_args) as r:
                    await r.identity()
                return
            except OSError:
                pass
            if time.monotonic() - polled > 3:  # a dead VM must not make us wait out the timeout
                polled = time.monotonic()
                machine = await self.pool.describe(self.machine.id)
                await self._check(machine, deadline, "the scheduler did not start")
                log = (await self.pool.console_output(machine.id)).strip().splitlines()
                self.pool.report(stage=f"scheduler VM: {log[-1][:100] if log else 'booting'}")
            elif time.monotonic() > deadline:
                await self._check(self.machine, deadline, "the scheduler did not start")
            await asyncio.sleep(0.5)

    async def _check(self, machine: Machine, deadline: float, what: str) -> None:
        if machine.state not in ("pending", "running"):
            raise ProviderError(await self.pool.boot_failure(machine, what))
        if time.monotonic() > deadline:
            timeout = self.pool.options.scheduler_timeout
            raise TimeoutError(
                await self.pool.boot_failure(machine, f"{what} within {timeout:.0f} s")
            )

    async def close(self) -> None:
        if self.machine is not None and self.pool.provider is not None:
            await self.pool.terminate(self.machine.id)
        await super().close()


class WorkerVM(ProcessInterface):
    """One Dask worker on one VM, named before it boots."""

    def __init__(self, scheduler: str, name: str, pool: VMPool) -> None:
        super().__init__(scheduler=scheduler, name=name)
        # ProcessInterface takes these but does not keep them.
        self.scheduler = scheduler
        self.name = name
        self.pool = pool

    @property
    def machine(self) -> Machine | None:
        """This worker's VM: None before launch, or while the cloud is short of capacity."""
        return self.pool.assigned.get(self.name)

    @classmethod
    def adopt(cls, scheduler: str, name: str, pool: VMPool, machine: Machine) -> WorkerVM:
        """A worker of a running cluster this client reconnected to."""
        worker = cls(scheduler, name, pool)
        pool.assigned[name] = machine
        worker.status = Status.running
        return worker

    async def start(self) -> None:
        # Started once the cloud took the request, with or without capacity for it yet:
        # a VM asked for in the background joins when it lands.
        await self.pool.launch_worker(self.name, self.scheduler)
        await super().start()

    async def close(self) -> None:
        if self.pool.provider is not None:
            if self.machine is not None:
                await self.pool.terminate(self.machine.id)
            else:
                self.pool.cancel(self.name)
        await super().close()

    def __repr__(self) -> str:
        where = self.machine.id if self.machine else "not launched"
        return f"<WorkerVM {self.name} {where} {self.status.name}>"
