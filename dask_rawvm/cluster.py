"""``RawVMCluster``: a Dask cluster whose scheduler and workers are raw VMs.

Knows Dask, not clouds: options come from :mod:`dask_rawvm.config`, VMs from a
provider through :class:`dask_rawvm.machines.VMPool`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import html
import logging
import math
import time
import uuid
import weakref
from collections import Counter
from contextlib import suppress
from typing import Any

import dask.config
from dask.utils import parse_timedelta
from distributed.comm import get_address_host
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.objects import SchedulerInfo
from distributed.scheduler import Scheduler
from distributed.utils import Log, Logs

from dask_rawvm.catalog import Needs
from dask_rawvm.config import ClusterOptions, resolve_options
from dask_rawvm.cost import affordable_count, check_budget
from dask_rawvm.localcloud import CREDENTIALS, LocalCloud
from dask_rawvm.machines import WORKER_PREFIX, SchedulerVM, VMPool, WorkerVM
from dask_rawvm.progress import Progress
from dask_rawvm.providers import Provider, create_provider
from dask_rawvm.providers.aws import MAX_IDS_PER_CALL, AWSProvider, live_instances_sync

logger = logging.getLogger(__name__)


class RawVMAdaptive(Adaptive):
    """Adaptive scaling for VMs that cost money.

    Scale-down goes through the cluster's ``scale_down``, which retires the
    chosen workers (their data moves to the others) and terminates, in one
    call, only the VMs of workers that actually retired. Distributed's own
    Adaptive terminates every chosen worker whatever ``retire_workers`` said.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Give idle VMs back within seconds; three quiet intervals in a row so
        # a burst of short tasks does not make the cluster thrash.
        kwargs.setdefault("interval", "1s")
        kwargs.setdefault("wait_count", 3)
        super().__init__(*args, **kwargs)

    async def scale_down(self, workers: list[str]) -> None:  # type: ignore[override]
        cluster = self.cluster
        assert isinstance(cluster, SpecCluster)
        if workers:
            await cluster.scale_down(workers)


class RawVMCluster(SpecCluster):
    """A Dask cluster on raw VMs: EC2, any EC2-compatible endpoint, or the local cloud.

    Used where ``LocalCluster`` is: as a context manager, sync or with
    ``asynchronous=True``, with ``scale``, ``adapt``, ``get_client`` and ``close``.
    Each worker is one VM, named before it boots (``worker-0``, ``worker-1``, ...
    never reused). Every VM powers itself off when its Dask process ends, and
    ``close()`` (also run at garbage collection and interpreter exit) terminates
    every VM the cluster made.

    Parameters
    ----------
    n_workers
        Workers to start with.
    config_name
        Section of ``rawvm`` in dask's config to read options from (``"local"``,
        ``"aws"``, or a profile). See :func:`dask_rawvm.config.resolve_options`.
    provider
        ``"local"`` starts and owns an embedded :class:`~dask_rawvm.localcloud.LocalCloud`;
        ``"aws"`` uses EC2 (or ``endpoint_url``).
    name
        Cluster name; every resource is tagged with it. Random when not given.
    region, endpoint_url
        Where the EC2 API is. AWS and the default credential chain when omitted.
    scheduler
        ``"vm"`` (default) runs the scheduler on its own VM, reachable from a
        laptop behind NAT; ``"local"`` runs it in this process, for clients
        inside the cloud's network.
    scheduler_vm_type, worker_vm_type
        Instance types.
    worker_vm_types
        Candidate worker types, best first (``["m7i.large", "m6i.large", "m5.large"]``):
        a launch fails over along them, and across zones and markets, when capacity
        runs out. All must share one architecture (and be all GPU or all CPU).
    spot_policy
        Workers' market: ``"on-demand"`` (default), ``"spot"``, or
        ``"spot_with_fallback"``: the spot capacity there is, the rest on-demand in
        the same pass (and lost spot workers replaced on-demand). The scheduler VM
        is always on-demand.
    zone
        An availability zone, or a list of them; every zone of the region when omitted.
    capacity_retry_timeout
        How long to keep asking, in the background, for workers a launch could not
        get; the cluster runs with what it got meanwhile, and without the rest after.
    ami
        Machine image; Amazon Linux 2023 of the type's architecture when omitted
        (AWS's Deep Learning Base GPU image, with NVIDIA's driver, for GPU types).
    worker_nthreads, worker_memory_limit
        Per-worker threads (the VM's vCPUs when omitted) and memory limit.
    death_timeout
        Seconds a worker outlives an unreachable scheduler before its VM powers off.
    idle_timeout
        Seconds with no client and no task after which the scheduler VM shuts down.
    scheduler_timeout
        How long to wait for the scheduler VM to boot and answer.
    boot_delay
        Local cloud only: seconds a VM stays pending.
    tags
        Extra tags for every resource.
    environment
        What the VMs install: ``"local"`` (default: this environment, translated
        for the VMs' platform, with editable installs and loose local modules
        shipped as wheels), a list of requirements, or the path of a lock file
        (``requirements.txt``, ``uv.lock``, ``conda-lock.yml``).
    environment_ignore
        Packages of the environment the VMs do without.
    environment_resolver
        ``"uv"`` (default; resolves for the VMs' platform) or ``"pip-tools"``,
        which can only resolve for this machine's platform (an error otherwise).
    max_workers
        A ceiling: starting, scaling or adapting past it is an error before any
        VM is launched (adapt's ``maximum`` is clamped to it).
    worker_cpu, worker_memory, worker_gpu, arm
        Choose the worker type by need instead of by name: at least ``worker_cpu``
        vCPUs and ``worker_memory`` ("16 GiB"), GPUs (``1``, ``"A10G"`` or
        ``(4, "A100")``), Graviton (``arm=True``); the cheapest type that fits wins.
    max_hourly_cost
        USD per hour the cluster may not exceed: a start or scale-up that would
        is refused before anything launches (estimated from list prices).
    allow_ingress_from
        CIDRs that may reach the scheduler and dashboard ports (the cluster's own
        security group); this machine's public address by default, never 0.0.0.0/0
        unless given.
    hosts, workers_per_host, connect_options
        ``provider="ssh"``: the machines (``"user@host"``, ``"host:2222"``), how
        many workers each may run, and extra ``asyncssh.connect`` options.
    **kwargs
        Passed to :class:`distributed.deploy.spec.SpecCluster` (``asynchronous``,
        ``loop``, ``security``, ``shutdown_on_close``, ``silence_logs``).

    Examples
    --------
    >>> with RawVMCluster(n_workers=3) as cluster:        # doctest: +SKIP
    ...     client = cluster.get_client()
    ...     cluster.adapt(minimum=0, maximum=20)
    """

    def __init__(
        self,
        n_workers: int = 0,
        *,
        config_name: str | None = None,
        provider: str | None = None,
        name: str | None = None,
        region: str | None = None,
        endpoint_url: str | None = None,
        scheduler: str | None = None,
        scheduler_vm_type: str | None = None,
        worker_vm_type: str | None = None,
        worker_vm_types: list[str] | None = None,
        spot_policy: str | None = None,
        zone: str | list[str] | None = None,
        capacity_retry_timeout: float | str | None = None,
        ami: str | None = None,
        worker_nthreads: int | None = None,
        worker_memory_limit: str | None = None,
        death_timeout: float | str | None = None,
        idle_timeout: float | str | None = None,
        scheduler_timeout: float | str | None = None,
        boot_delay: float | str | None = None,
        tags: dict[str, str] | None = None,
        environment: str | list[str] | None = None,
        environment_ignore: list[str] | None = None,
        environment_resolver: str | None = None,
        max_workers: int | None = None,
        worker_cpu: int | None = None,
        worker_memory: str | None = None,
        worker_gpu: int | str | tuple[int, str] | None = None,
        arm: bool | None = None,
        max_hourly_cost: float | None = None,
        allow_ingress_from: list[str] | None = None,
        tls: bool | None = None,
        hosts: list[str] | None = None,
        workers_per_host: int | None = None,
        connect_options: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.options: ClusterOptions = resolve_options(
            config_name,
            provider=provider,
            name=name,
            region=region,
            endpoint_url=endpoint_url,
            scheduler=scheduler,
            scheduler_vm_type=scheduler_vm_type,
            worker_vm_type=worker_vm_type,
            worker_vm_types=worker_vm_types,
            spot_policy=spot_policy,
            zone=zone,
            capacity_retry_timeout=capacity_retry_timeout,
            ami=ami,
            worker_nthreads=worker_nthreads,
            worker_memory_limit=worker_memory_limit,
            death_timeout=death_timeout,
            idle_timeout=idle_timeout,
            scheduler_timeout=scheduler_timeout,
            boot_delay=boot_delay,
            tags=tags,
            environment=environment,
            environment_ignore=environment_ignore,
            environment_resolver=environment_resolver,
            max_workers=max_workers,
            worker_cpu=worker_cpu,
            worker_memory=worker_memory,
            worker_gpu=worker_gpu,
            arm=arm,
            max_hourly_cost=max_hourly_cost,
            allow_ingress_from=allow_ingress_from,
            tls=tls,
            hosts=hosts,
            workers_per_host=workers_per_host,
            connect_options=connect_options,
        )
        if n_workers < 0:
            raise ValueError(f"n_workers={n_workers} must be 0 or more")
        if self.options.tls and kwargs.get("security") is not None:
            raise ValueError(
                "security= and tls=True both set the cluster's TLS: dask-rawvm makes a CA "
                "for each cluster and gives every VM and this client a certificate from it. "
                "Drop security=, or pass tls=False to run plain TCP"
            )
        self._check_limit(n_workers)
        if not kwargs.get("shutdown_on_close", True) and self.options.provider == "local":
            raise ValueError(
                "shutdown_on_close=False needs a cloud that outlives this process, and an "
                "embedded local cloud does not: run `dask-rawvm localcloud` and pass "
                "endpoint_url=..., or use provider='aws'"
            )
        self._n_workers = n_workers
        self.cluster_name = self.options.name or f"rawvm-{uuid.uuid4().hex[:8]}"
        self.cloud: LocalCloud | None = None
        self.pool = VMPool(self.cluster_name, self.options)
        self.pool.on_gave_up = self._forget_unlaunched
        self._next_index = 0
        self._launched: set[str] = set()
        worker = {"cls": WorkerVM, "options": {"pool": self.pool}}
        workers = {self._take_name(): worker for _ in range(n_workers)}
        # An unclosed cluster's VMs are terminated at garbage collection or exit. A
        # local cloud needs no sweep: it halts its VMs when it goes.
        self._finalizer = weakref.finalize(self, _terminate_leftovers, self.pool)
        if self.options.provider == "local":
            self._finalizer.detach()
        try:
            super().__init__(
                workers=workers,
                scheduler=self._scheduler_spec(),
                worker=worker,
                name=self.cluster_name,
                **kwargs,
            )
        except BaseException:
            # SpecCluster leaves its event loop thread running when start fails.
            with suppress(Exception):
                self._loop_runner.stop()
            raise

    def _scheduler_spec(self) -> dict[str, Any]:
        if self.options.scheduler == "local":
            # In this process: VMs of the local cloud reach loopback; VMs of a real
            # cloud reach this machine only from inside its network.
            host = "127.0.0.1" if self.options.provider == "local" else "0.0.0.0"
            options = {"host": host, "dashboard_address": ":0", "protocol": self.pool.scheme}
            return {"cls": Scheduler, "options": options}
        return {"cls": SchedulerVM, "options": {"pool": self.pool}}

    # -- names -----------------------------------------------------------------------
    def _take_name(self) -> str:
        name = f"{WORKER_PREFIX}{self._next_index}"
        self._next_index += 1
        return name

    def new_worker_spec(self) -> dict[str, Any]:
        """The next worker: a name never used before in this cluster."""
        return {self._take_name(): self.new_spec}

    # -- start and stop -------------------------------------------------------------
    async def _start(self) -> None:
        if self.pool.provider is not None or self.status != Status.created:
            await super()._start()
            return
        progress = Progress(f"RawVMCluster {self.cluster_name}", self.options.progress)
        self.pool.report = progress.update
        try:
            progress.update(stage="checking the machines and building the environment")
            await self._start_provider()
        except BaseException:
            self.status = Status.failed
            progress.close()
            await self._release_cloud()
            raise
        try:
            await super()._start()
            if self.pool.adopted_workers:
                await self._adopt_workers()
            progress.update(stage=f"scheduler ready at {self.scheduler_address}")
        finally:
            progress.close()
            self.pool.report = lambda **fields: None

    async def _start_provider(self) -> None:
        options = self.options
        endpoint_url, credentials = options.endpoint_url, None
        if options.provider == "local":
            self.cloud = LocalCloud(
                region=options.region or "us-east-1", boot_delay=options.boot_delay
            )
            await asyncio.to_thread(self.cloud.start)
            endpoint_url, credentials = self.cloud.endpoint_url, CREDENTIALS
        provider = create_provider(options, self.cluster_name, endpoint_url, credentials)
        self.pool.provider = provider
        try:
            await provider.start()
            provider.check_capacity(self._n_workers)
            if options.name is not None:
                await self.pool.find_running(provider)
            await self._preflight(provider)
            await self._prepare_tls()
        except BaseException:
            with suppress(Exception):
                await self.pool.close()  # what preflight stored (the bundle's bucket)
            await provider.close()
            self.pool.provider = None
            raise

    async def _preflight(self, provider: Provider) -> None:
        """Every problem we can see is raised here, before any VM is launched."""
        await self._choose_worker_types(provider)
        options = self.options
        roles = {"worker": options.worker_vm_type}
        if options.scheduler == "vm":
            roles["scheduler"] = options.scheduler_vm_type
        await provider.preflight(roles)
        self._check_budget(self._n_workers, provider)
        if options.environment is not None:
            targets = {role: provider.target_for(vm_type) for role, vm_type in roles.items()}
            await self.pool.prepare_environments(targets)

    async def _choose_worker_types(self, provider: Provider) -> None:
        """The worker types, best first: named, or the cheapest that meet the needs.

        Every candidate must run the same environment (architecture and accelerator)
        as the first: the workers' environment is built once, for one platform.
        """
        options = self.options
        needs = (options.worker_cpu, options.worker_memory, options.worker_gpu, options.arm)
        if options.worker_vm_types:
            candidates = await provider.choose(names=list(options.worker_vm_types))
        elif any(need is not None for need in needs):
            candidates = await provider.choose(needs=Needs.from_options(*needs))
        else:
            return
        target = provider.target_for(candidates[0])
        others = [t for t in candidates if provider.target_for(t) != target]
        if others and options.worker_vm_types:
            raise ValueError(
                f"worker_vm_types mixes platforms: {others} do not run the {target.arch}/"
                f"{target.accelerator} environment of {candidates[0]}; the workers share one "
                "environment, so list types of one architecture (and all GPU or all CPU)"
            )
        candidates = [t for t in candidates if t not in others]
        self.options = self.pool.options = dataclasses.replace(
            options, worker_vm_type=candidates[0], worker_vm_types=candidates
        )
        logger.info("worker VM types, best first: %s", ", ".join(candidates))

    async def _prepare_tls(self) -> None:
        """The cluster's certificates: new ones, or those of the cluster we reconnect to."""
        if not self.options.tls:
            return
        if self.pool.adopted_scheduler is not None:
            await self.pool.reuse_tls()
        else:
            await self.pool.prepare_tls()
        self.security = self.pool.security
        if self.options.scheduler == "local":
            # The in-process scheduler presents the scheduler VM role's certificate.
            self.scheduler_spec["options"]["security"] = self.pool.scheduler_security

    async def _adopt_workers(self) -> None:
        """Take over the workers of the running cluster we reconnected to.

        Workers are matched to their VMs by address; the spec becomes the adopted
        workers, topped up to ``n_workers`` with fresh names.
        """
        assert self.scheduler_comm is not None
        identity = await self.scheduler_comm.identity()
        by_ip = {m.private_ip: m for m in self.pool.adopted_workers}
        contact = getattr(self.scheduler, "contact_address", None) or self.scheduler_address
        adopted: dict[str, WorkerVM] = {}
        for address, info in identity.get("workers", {}).items():
            name = str(info.get("name"))
            machine = by_ip.get(get_address_host(address))
            if machine is None or not name.startswith(WORKER_PREFIX):
                continue
            adopted[name] = WorkerVM.adopt(contact, name, self.pool, machine)
            self._next_index = max(self._next_index, self._index(name) + 1)
        fresh = max(0, self._n_workers - len(adopted))
        self.worker_spec = {name: self.new_spec for name in adopted}
        self.worker_spec.update({self._take_name(): self.new_spec for _ in range(fresh)})
        self.workers.update(adopted)
        self._launched.update(adopted)
        logger.info("reconnected to %s: adopted workers %s", self.cluster_name, sorted(adopted))

    async def _close(self) -> None:
        if not self.shutdown_on_close and self.status == Status.running:
            await self._disconnect()
            return
        try:
            await super()._close()
        finally:
            with suppress(Exception):
                leftovers = await self.pool.close()
                if leftovers:
                    logger.info(
                        "terminated %d leftover VM(s) of %s", len(leftovers), self.cluster_name
                    )
            await self._release_cloud()
            self._finalizer.detach()

    async def _disconnect(self) -> None:
        """Leave the cluster running for a later ``RawVMCluster(name=...)``.

        Its scheduler VM still shuts everything down after ``idle_timeout``.
        """
        if self._adaptive is not None:
            self._adaptive.stop()
        for worker in self.workers.values():
            worker.status = Status.closed  # this object's handle, not the VM
        if self.scheduler_comm is not None:
            await self.scheduler_comm.close_rpc()
        if self.pool.provider is not None:
            await self.pool.provider.close()
            self.pool.provider = None
        self._finalizer.detach()
        logger.info("left cluster %s running (shutdown_on_close=False)", self.cluster_name)
        await Cluster._close(self)

    async def _release_cloud(self) -> None:
        if self.cloud is not None:
            await asyncio.to_thread(self.cloud.close)

    # -- scaling ---------------------------------------------------------------------
    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Scale to ``n`` workers; scaling down moves data off the removed workers first.

        The workers removed are those not yet connected, then those holding the
        least data.
        """
        self._check_limit(n)
        self._order_by_value()
        return super().scale(n, memory=memory, cores=cores)

    def _check_budget(self, n: int, provider: Provider | None = None) -> None:
        """Refuse a size whose estimated cost would pass ``max_hourly_cost``; say the estimate."""
        provider = provider or self.pool.provider
        if provider is None:
            return
        options = self.options
        worker_price = self._worker_price(provider)
        running = self.pool.meter.cost_per_hour()
        if self.pool.meter.running():
            added = worker_price * max(0, n - len(self.worker_spec))
        else:  # nothing launched yet: the scheduler VM is part of what is about to be
            scheduler = options.scheduler == "vm"
            added = worker_price * n + (
                provider.hourly_price(options.scheduler_vm_type, "on-demand") if scheduler else 0
            )
        if added:
            logger.info("estimated cost: +$%.3f/h (now $%.3f/h)", added, running)
        check_budget(running, added, options.max_hourly_cost)

    def _worker_price(self, provider: Provider) -> float:
        """USD per hour of a worker VM at worst: the dearest candidate type, on-demand."""
        types = self.options.worker_vm_types or [self.options.worker_vm_type]
        return max(provider.hourly_price(t, "on-demand") for t in types)

    def _check_limit(self, n: int) -> None:
        """Refuse a size over ``max_workers`` or the provider's capacity, before any launch."""
        limit = self.options.max_workers
        if limit is not None and n > limit:
            raise ValueError(
                f"asked for {n} workers, over max_workers={limit}: ask for fewer, or raise "
                "max_workers (in the call or the rawvm config)"
            )
        provider = getattr(getattr(self, "pool", None), "provider", None)
        if provider is not None:
            provider.check_capacity(n)
            self._check_budget(n, provider)

    def _order_by_value(self) -> None:
        """Re-order the worker spec so the cheapest workers to lose come last.

        SpecCluster.scale removes workers from the end of the spec.
        """
        managed = {
            info.get("name"): info.get("metrics", {}).get("managed_bytes", 0)
            for info in self.scheduler_info.get("workers", {}).values()
        }
        # Connected before not connected, more data before less, older before newer.
        order = sorted(
            self.worker_spec,
            key=lambda n: (n not in managed, -managed.get(n, 0), self._index(n)),
        )
        self.worker_spec = {name: self.worker_spec[name] for name in order}

    @staticmethod
    def _index(name: str) -> int:
        return (
            int(str(name).removeprefix(WORKER_PREFIX)) if str(name).startswith(WORKER_PREFIX) else 0
        )

    async def _correct_state_internal(self) -> None:
        to_close = set(self.workers) - set(self.worker_spec)
        if to_close and self.status == Status.running and self.scheduler_comm is not None:
            kept = await self._retire(to_close)
            for name in kept:  # still holding data nobody could take: keep its VM
                self.worker_spec[name] = self.new_spec
        self._rename_replacements()
        await super()._correct_state_internal()
        self._launched.update(self.workers)

    async def _retire(self, names: set[str]) -> set[str]:
        """Retire workers by name, moving their data; return the names that would not go.

        SpecCluster retires by name through a parameter that takes addresses
        (dask/distributed#5577), so its scale-down kills workers with their data.
        """
        assert self.scheduler_comm is not None
        await self.scheduler_comm.retire_workers(
            names=sorted(names), close_workers=True, remove=True
        )
        identity = await self.scheduler_comm.identity()
        connected = {info.get("name") for info in identity.get("workers", {}).values()}
        kept = names & connected
        if kept:
            logger.warning(
                "workers %s could not hand off their data and keep running", sorted(kept)
            )
        return kept

    def _update_worker_status(self, op: str, msg: Any) -> None:
        super()._update_worker_status(op, msg)
        if op == "remove" and self.status == Status.running:
            # SpecCluster forgets a lost worker after lost-worker-timeout but does not
            # replace it; a fixed-size cluster should get its worker back.
            delay = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
            asyncio.get_running_loop().call_later(delay + 0.5, self._correct_state)

    def _rename_replacements(self) -> None:
        """A worker whose VM died is replaced under a new name: names are never reused.

        A lost spot worker (interrupted, most likely) is replaced on-demand when the
        spot policy falls back: the spot capacity it had was just taken back.
        """
        for name in [n for n in self.worker_spec if n in self._launched and n not in self.workers]:
            spec = self.worker_spec.pop(name)
            self.worker_spec[self._take_name()] = spec
            self._launched.discard(name)
            machine = self.pool.assigned.get(name)
            if machine is not None and machine.market == "spot":
                self.pool.replace_on_demand += 1

    def _forget_unlaunched(self, names: list[str]) -> None:
        """Workers whose VMs never found capacity leave the spec: the cluster goes without.

        Adaptive asks again on its next pass if the load still calls for them.
        """
        for name in names:
            self.worker_spec.pop(name, None)
            worker = self.workers.pop(name, None)
            if worker is not None:
                worker.status = Status.closed
        logger.warning(
            "%s runs with %d workers: no capacity for %d more",
            self.cluster_name,
            len(self.workers),
            len(names),
        )

    def adapt(
        self,
        Adaptive: type[Adaptive] = RawVMAdaptive,
        minimum: float = 0,
        maximum: float = math.inf,
        minimum_cores: int | None = None,
        maximum_cores: int | None = None,
        minimum_memory: str | None = None,
        maximum_memory: str | None = None,
        **kwargs: Any,
    ) -> Adaptive:
        """Scale between ``minimum`` and ``maximum`` workers with the load.

        Same parameters as :meth:`distributed.deploy.spec.SpecCluster.adapt`; the
        default :class:`RawVMAdaptive` gives idle VMs back within seconds and
        terminates only workers that retired.
        """
        provider = self.pool.provider
        ceiling = min(
            self.options.max_workers or math.inf,
            provider.capacity if provider else math.inf,
        )
        if provider is not None:
            price = self._worker_price(provider)
            more = affordable_count(
                self.pool.meter.cost_per_hour(), price, self.options.max_hourly_cost
            )
            if more is not None:
                ceiling = min(ceiling, len(self.workers) + more)
        if maximum > ceiling:
            logger.info(
                "adapt maximum %s clamped to %s (max_workers, capacity, budget)", maximum, ceiling
            )
            maximum = ceiling
        return super().adapt(
            Adaptive,
            minimum,
            maximum,
            minimum_cores,
            maximum_cores,
            minimum_memory,
            maximum_memory,
            **kwargs,
        )

    # -- introspection -----------------------------------------------------------------
    @property
    def instances(self) -> dict[str, str]:
        """Instance id of each worker VM, by worker name."""
        return {
            name: worker.machine.id
            for name, worker in self.workers.items()
            if getattr(worker, "machine", None) is not None
        }

    def user_data(self) -> str:
        """The bootstrap script a new worker VM boots with, exactly as the VM gets it.

        The ``job_script()`` of this project: what runs on the VM, and nothing secret.
        """
        contact = getattr(self.scheduler, "contact_address", None) or self.scheduler_address
        name = f"{WORKER_PREFIX}{self._next_index}"
        return self.sync(self.pool.worker_user_data, contact, [name])

    async def _get_logs(
        self, cluster: bool = True, scheduler: bool = True, workers: Any = True
    ) -> Logs:
        """Each VM's boot log (the bootstrap and its Dask process), by worker name."""
        logs = Logs()
        if cluster:
            logs["Cluster"] = Log("\n".join(line[1] for line in self._cluster_manager_logs))
        machine = getattr(self.scheduler, "machine", None)
        if scheduler and machine is not None:
            logs["Scheduler"] = Log(await self.pool.console_output(machine.id))
        names = list(self.workers) if workers is True else list(workers or [])
        for name in names:
            worker = self.workers.get(name)
            if worker is not None and worker.machine is not None:
                logs[name] = Log(await self.pool.console_output(worker.machine.id))
        return logs

    async def _wait_for_workers(self, n_workers: int = 0, timeout: Any = None) -> None:
        """Wait for workers; a worker VM that died at boot is an error with its log, not a hang."""
        deadline = time.monotonic() + parse_timedelta(timeout) if timeout else None
        progress = Progress(
            f"{self.cluster_name}: waiting for {n_workers} workers", self.options.progress
        )
        checked, running = time.monotonic(), 0
        try:
            while True:
                assert self.scheduler_comm is not None
                self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity())
                connected = {w["name"] for w in self.scheduler_info["workers"].values()}
                progress.update(
                    vms=self._vm_summary(),
                    requested=len(self.workers),
                    running=max(running, len(connected)),
                    connected=len(connected),
                )
                if len(connected) >= n_workers:
                    return
                waiting = [w for n, w in self.workers.items() if n not in connected and w.machine]
                if time.monotonic() - checked > 3:
                    checked = time.monotonic()
                    booting = await self.pool.raise_if_dead(
                        [w.machine for w in waiting if w.machine]
                    )
                    running = len(connected) + sum(m.state == "running" for m in booting)
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(
                        f"only {len(connected)} of {n_workers} workers connected within "
                        f"{timeout}; "
                        + await self.pool.describe_waiting({w.name: w.machine for w in waiting})
                    )
                await asyncio.sleep(0.2)
        finally:
            progress.close()

    @property
    def cost_per_hour(self) -> float:
        """Estimated USD per hour of the VMs running now (list prices)."""
        return self.pool.meter.cost_per_hour()

    @property
    def spent(self) -> float:
        """Estimated USD spent on this cluster's VMs so far (per second, 60 s minimum)."""
        return self.pool.meter.spent()

    def _vm_summary(self) -> str:
        """``3 x t3.large on-demand in us-east-1a``, one phrase per kind of VM."""
        kinds = Counter((m.vm_type, m.market, m.zone or "?") for m in self.pool.live())
        return ", ".join(f"{n} x {t} {mk} in {z}" for (t, mk, z), n in sorted(kinds.items()))

    def __repr__(self) -> str:
        return (
            f"RawVMCluster({self.cluster_name!r}, provider={self.options.provider!r}, "
            f"workers={len(self.workers)}{self._waiting_note()}, status={self.status.name}, "
            f"vms=[{self._vm_summary()}], cost=${self.cost_per_hour:.3f}/h)"
        )

    def _waiting_note(self) -> str:
        waiting = len(self.pool.waiting)
        return f" ({waiting} waiting for capacity)" if waiting else ""

    def _repr_html_(self, cluster_status: Any = None) -> str:
        connected = len(self.scheduler_info.get("workers", {})) if self.scheduler_info else 0
        rows = {
            "Provider": f"{self.options.provider} ({self.options.region or 'default region'})",
            "Dashboard": f'<a href="{self.dashboard_link}" target="_blank">'
            f"{self.dashboard_link}</a>"
            if self.scheduler_address
            else "",
            "Workers": f"{connected} connected of {len(self.workers)} requested"
            + self._waiting_note(),
            "VMs": self._vm_summary() or "none",
            "Cost": f"${self.cost_per_hour:.3f}/h now, ${self.spent:.2f} spent",
            "Status": self.status.name,
        }
        body = "".join(
            f'<tr><th style="text-align:left">{k}</th><td style="text-align:left">{v}</td></tr>'
            for k, v in rows.items()
        )
        title = f"<h3>RawVMCluster {html.escape(self.cluster_name)}</h3>"
        return f"<div>{title}<table>{body}</table></div>"


def _terminate_leftovers(pool: VMPool) -> None:
    """At garbage collection or exit of an unclosed cluster: terminate its VMs.

    Synchronous botocore on purpose: at interpreter exit the cluster's event loop
    may be gone and executors refuse new work, which aiobotocore needs.
    """
    provider = pool.provider
    cleanup_blocking = getattr(provider, "cleanup_blocking", None)
    if cleanup_blocking is not None:  # a provider with its own synchronous sweep (SSH)
        cleanup_blocking()
        return
    if not isinstance(provider, AWSProvider):
        return
    import botocore.session

    ec2 = botocore.session.get_session().create_client(
        "ec2",
        region_name=provider.region,
        endpoint_url=provider.endpoint_url,
        **provider.credentials,
    )
    try:
        ids = [i["InstanceId"] for i in live_instances_sync(ec2, pool.cluster)]
        for start in range(0, len(ids), MAX_IDS_PER_CALL):
            ec2.terminate_instances(InstanceIds=ids[start : start + MAX_IDS_PER_CALL])
    except Exception:
        logger.exception("could not terminate the VMs of unclosed cluster %s", pool.cluster)
