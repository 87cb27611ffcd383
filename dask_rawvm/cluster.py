"""``RawVMCluster``: a Dask cluster whose scheduler and workers are raw VMs.

Knows Dask, not clouds: options come from :mod:`dask_rawvm.config`, machines from the
provider the options name (:func:`dask_rawvm.providers.provider_for`), through the
parts in :mod:`dask_rawvm.machines`.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import logging
import math
import time
import uuid
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

import dask.config
from dask.utils import format_bytes, parse_bytes, parse_timedelta
from distributed import Client
from distributed.comm import get_address_host
from distributed.core import Status
from distributed.deploy.adaptive import Adaptive
from distributed.deploy.cluster import Cluster
from distributed.deploy.spec import SpecCluster
from distributed.objects import SchedulerInfo
from distributed.scheduler import Scheduler
from distributed.utils import Log, Logs
from tornado.ioloop import PeriodicCallback

from dask_rawvm import card
from dask_rawvm.cluster_log import ClusterLog, about
from dask_rawvm.config import (
    NOT_GIVEN,
    OPTION_NAMES,
    ClusterOptions,
    resolve_options,
    workers_to_wait_for,
)
from dask_rawvm.cost import CostReport
from dask_rawvm.data import pack_files
from dask_rawvm.errors import OptionError, WorkerBootTimeoutError
from dask_rawvm.log_guard import POLL_SECONDS as LOG_POLL_SECONDS
from dask_rawvm.log_guard import TOPIC as LOG_TOPIC
from dask_rawvm.log_guard import LogRateAlarm, plugin_bytes
from dask_rawvm.machines import (
    BootWatch,
    ClusterStore,
    CredentialForwarder,
    EnvironmentCheck,
    EnvironmentMismatch,
    Launcher,
    Ledger,
    Limits,
    ProviderSession,
    RunningCluster,
    SchedulerVM,
    Settings,
    WorkerNames,
    WorkerShape,
    WorkerVM,
    check_data_regions,
    is_worker_name,
    preflight,
    ship_files,
    worker_index,
    worker_shape,
)
from dask_rawvm.progress import Progress, Reporter
from dask_rawvm.providers import Machine, Provider, provider_for
from dask_rawvm.tls import offer_security, withdraw_security

logger = logging.getLogger(__name__)

#: Most workers a cluster started without ``n_workers`` (and without ``max_workers``)
#: adapts up to: enough for a first workload, a bounded bill if a graph asks for more.
DEFAULT_ADAPT_MAXIMUM = 10


class RawVMAdaptive(Adaptive):
    """Adaptive scaling for VMs that cost money.

    Scale-down goes through the cluster's ``scale_down``, which retires the
    chosen workers (their data moves to the others) and terminates, in one
    call, only the VMs of workers that actually retired. Distributed's own
    Adaptive terminates every chosen worker whatever ``retire_workers`` said.

    Its timing is distributed's, from ``distributed.adaptive.*`` (``interval``,
    ``wait-count``, ``target-duration``, ``minimum``, ``maximum``) unless given: the
    defaults there (checked every second, three quiet checks before a worker goes)
    already give idle VMs back within seconds without thrashing on bursts.
    """

    async def scale_up(self, n: int) -> None:  # type: ignore[override]
        cluster = self.cluster
        assert isinstance(cluster, RawVMCluster)
        if self.state != "stopped":  # (stopped by the user's scale() while it recommended)
            cluster._scale_to(n)  # not cluster.scale, the user's, which stops adapting

    async def scale_down(self, workers: list[str]) -> None:  # type: ignore[override]
        cluster = self.cluster
        assert isinstance(cluster, SpecCluster)
        if workers and self.state != "stopped":
            await cluster.scale_down(workers)


class RawVMCluster(SpecCluster):
    """A Dask cluster on raw VMs: EC2, any EC2-compatible endpoint, the local cloud, SSH hosts.

    Used where ``LocalCluster`` is: as a context manager, sync or with
    ``asynchronous=True``, with ``scale`` (also by ``cores=`` and ``memory=``),
    ``adapt``, ``get_client``, ``get_logs``, ``wait_for_workers`` and ``close``; like
    ``LocalCluster`` it returns with its workers connected (``wait_for_workers``).
    Each worker is one VM, named before it boots (``worker-0``, ``worker-1``, ...
    never reused), with the threads and memory of its type. Every VM powers itself
    off when its Dask process ends, and ``close()`` terminates every VM the cluster
    made; a cluster never closed is cleaned up at interpreter exit, or when garbage
    collected if it is not running (a running cluster is held by its event loop, as
    ``LocalCluster`` is).

    Parameters
    ----------
    n_workers
        Workers to start with. Not given: the cluster adapts, starting none and adding
        workers when work is submitted (``adapt(minimum=0, maximum=max_workers)``, at most
        10 workers when ``max_workers`` is not set), until ``scale`` or ``adapt`` says
        otherwise; a reconnect to a running cluster keeps its workers as they are.
        ``0``: none until ``scale`` or ``adapt``.
    config_name
        Section of ``rawvm`` in dask's config to read options from (``"local"``,
        ``"aws"``, or a profile). See :func:`dask_rawvm.config.resolve_options`.
    provider
        ``"local"`` starts and owns an embedded :class:`~dask_rawvm.localcloud.LocalCloud`;
        ``"aws"`` uses EC2 (or ``endpoint_url``); ``"ssh"`` uses ``hosts``
        (:data:`dask_rawvm.providers.PROVIDERS`).
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
        ``"auto"`` (default): EC2 picks one zone with capacity for the first launch and the
        whole cluster stays in it (no cross-zone traffic, which AWS bills at $0.01/GB each
        way). ``"any"`` spreads over every zone of the subnets; a zone (``"us-east-1a"``) or
        a list of zones keeps to those (a list spreads over them).
    vpc, subnets
        Where the VMs go: a VPC (``"vpc-..."``, every subnet of it) and/or subnets
        (``["subnet-..."]``, of one VPC). The region's default VPC when neither is given.
    security_groups
        Extra security groups for every VM (``["sg-..."]``, in the cluster's VPC), besides
        the cluster's own group.
    public_ip
        Whether each VM gets a public IPv4 address (default; $0.005/h each). ``False`` for
        private subnets that reach out through your own NAT gateway or endpoints: this
        client must then reach the scheduler's private address (from inside the VPC, or
        through a VPN or peering), and the scheduler admits the VPC's ranges.
    worker_disk_size, scheduler_disk_size
        GiB of the VMs' root volume (gp3): the OS, the environment, its cache and, on
        workers, what Dask spills to disk. At least the image's own size.
    capacity_retry_timeout
        How long to keep asking, in the background, for workers a launch could not
        get; the cluster runs with what it got meanwhile, and without the rest after.
    ami
        Machine image; Amazon Linux 2023 of the type's architecture when omitted
        (AWS's Deep Learning Base GPU image, with NVIDIA's driver, for GPU types).
    worker_nthreads, worker_memory_limit
        Per-worker threads (the type's vCPUs when omitted; an SSH host's CPUs over
        ``workers_per_host``) and memory limit (``"auto"``: the type's memory, shared
        as distributed shares it; a fraction of it, ``"6 GiB"``, or 0 for none). The
        worker spec says them, so ``scale(cores=, memory=)`` and ``adapt(maximum_memory=
        ...)`` work, and each VM's worker starts with exactly them.
    death_timeout
        Seconds a worker outlives an unreachable scheduler before its VM powers off.
    idle_timeout
        Seconds with no client and no task after which the scheduler VM shuts down.
    scheduler_timeout
        How long to wait for the scheduler VM to boot and answer.
    wait_for_workers
        What start waits for, as ``LocalCluster`` does: ``True`` (default) every
        worker launched (those the cloud has no capacity for yet are not waited for),
        ``False`` none, a count (``8``) or a fraction of ``n_workers`` (``0.9``).
    worker_start_timeout
        How long start waits for them; then it fails with a
        :class:`~dask_rawvm.errors.WorkerBootTimeoutError` (distributed's
        ``WorkerStartTimeoutError``) saying what each missing VM was doing, and
        terminates what it launched.
    boot_delay
        Local cloud only: seconds a VM stays pending.
    local_image
        Local cloud only: ``"warm"`` (default) VMs share this machine's Python, uv and
        caches; ``"bare"`` VMs have what a fresh Amazon Linux 2023 VM has (a system
        Python, curl; no uv, no pip, nothing cached, a filesystem view of their own).
    tags
        Extra tags for every resource.
    environment
        What the VMs install: ``"local"`` (default: every distribution of this
        environment at its version, translated for the VMs' platform; dask-rawvm's
        client side left out), a list of requirements, or the path of a lock file
        (``requirements.txt``, ``uv.lock``, ``conda-lock.yml``).
    environment_ignore
        Packages of the environment the VMs do without.
    environment_resolver
        ``"uv"`` (default; resolves for the VMs' platform) or ``"pip-tools"``,
        which can only resolve for this machine's platform (an error otherwise).
    environment_check
        Once VMs are up, their distributions are compared with this process's
        (after translation): ``"error"`` (default) stops a start whose VMs lack or
        differ in a package this process has imported, naming each; ``"warn"`` only
        warns; ``"off"`` skips the check.
    local_code
        Ship this environment's local code (editable projects, loose modules next
        to the script or notebook) whatever ``environment`` is (default True).
    max_workers
        A ceiling: starting, scaling or adapting past it is an error before any
        VM is launched (adapt's ``maximum`` is clamped to it).
    worker_cpu, worker_memory, worker_gpu, arm
        Choose the worker type by need instead of by name: at least ``worker_cpu``
        vCPUs and ``worker_memory`` ("16 GiB"), GPUs (``1``, ``"A10G"`` or
        ``(4, "A100")``), Graviton (``arm=True``); the cheapest type that fits wins.
    max_hourly_cost
        USD per hour the cluster may not exceed: a start or scale-up that would
        is refused before anything launches (estimated with each worker's market:
        spot priced as spot, from live spot prices where the cloud has them).
    log_rate_warning
        Records per second one logger of one worker may log before the client warns,
        naming the logger and the setting behind it (default 100: distributed at INFO
        logs a few a minute, at DEBUG hundreds a second); None never warns.
    allow_ingress_from
        CIDRs that may reach the scheduler and dashboard ports (the cluster's own
        security group); this machine's public address by default, never 0.0.0.0/0
        unless given.
    tls
        Mutual TLS on every Dask connection with a CA made for the cluster (default);
        ``False`` for plain TCP.
    credentials
        The AWS identity of the VMs (``docs/data.rst`` says exactly what each grants):
        ``"forward"`` (default on EC2 and the local cloud) this client's, as short-lived
        credentials (STS ``GetSessionToken``) sent over the cluster's TLS connection and
        served on each VM where AWS SDKs look for refreshable credentials (the
        container-credentials endpoint); this client refreshes them at half their life
        while connected. ``"role"``: an IAM instance profile on every VM, the one
        ``iam_instance_profile`` names, else a role and profile the cluster makes for
        itself, granting exactly what ``data`` names, tagged with the cluster and removed
        with it; the VMs' SDKs read it from the instance metadata service, for the VMs'
        whole life. ``None``: nothing.
    iam_instance_profile
        With ``credentials="role"``: the instance profile (name or ARN) of every VM, in
        place of the cluster's own.
    data
        S3 URLs the cluster reads and writes (``["s3://bucket/prefix"]``): all that the
        role of ``credentials="role"`` grants (listing each bucket; reading, writing and
        deleting under each prefix); a bucket in another region than the cluster's is a
        warning with what that transfer costs.
    files
        Small local files and directories (``["data/lookup.csv", "config/"]``) put in
        every VM's working directory under the same relative path, workers added later
        included: a task opens them as it would here. At most 10 MiB in all (an error
        before anything launches). ``cluster.upload(path)`` adds more.
    hosts, workers_per_host, connect_options
        ``provider="ssh"``: the machines (``"user@host"``, ``"host:2222"``), how
        many workers each may run, and extra ``asyncssh.connect`` options.
    progress
        Live progress while starting: ``True``/``False`` to force it on or off; by
        default shown in a terminal or Jupyter only.
    launch_window
        Launches (and terminations) asked for within this long go out as one call.
    **kwargs
        Passed to :class:`distributed.deploy.spec.SpecCluster` (``asynchronous``,
        ``loop``, ``security``, ``shutdown_on_close``, ``silence_logs``: ``logging.WARN``
        by default, as ``LocalCluster``'s).

    Examples
    --------
    >>> with RawVMCluster(n_workers=3) as cluster:        # doctest: +SKIP
    ...     client = cluster.get_client()
    ...     cluster.adapt(minimum=0, maximum=20)
    """

    def __init__(
        self,
        n_workers: int | None = None,
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
        vpc: str | None = None,
        subnets: list[str] | None = None,
        security_groups: list[str] | None = None,
        public_ip: bool | None = None,
        worker_disk_size: int | None = None,
        scheduler_disk_size: int | None = None,
        capacity_retry_timeout: float | str | None = None,
        ami: str | None = None,
        worker_nthreads: int | None = None,
        worker_memory_limit: str | None = None,
        death_timeout: float | str | None = None,
        idle_timeout: float | str | None = None,
        scheduler_timeout: float | str | None = None,
        wait_for_workers: bool | int | float | None = None,
        worker_start_timeout: float | str | None = None,
        boot_delay: float | str | None = None,
        local_image: str | None = None,
        tags: dict[str, str] | None = None,
        environment: str | list[str] | None = None,
        environment_ignore: list[str] | None = None,
        environment_resolver: str | None = None,
        environment_check: str | None = None,
        local_code: bool | None = None,
        max_workers: int | None = None,
        worker_cpu: int | None = None,
        worker_memory: str | None = None,
        worker_gpu: int | str | tuple[int, str] | None = None,
        arm: bool | None = None,
        max_hourly_cost: float | None = None,
        log_rate_warning: float | None = None,
        allow_ingress_from: list[str] | None = None,
        tls: bool | None = None,
        credentials: str | None = NOT_GIVEN,
        iam_instance_profile: str | None = None,
        data: list[str] | None = None,
        files: list[str] | None = None,
        hosts: list[str] | None = None,
        workers_per_host: int | None = None,
        connect_options: dict[str, Any] | None = None,
        progress: bool | None = None,
        launch_window: float | str | None = None,
        **kwargs: Any,
    ) -> None:
        # The keywords above are the options (a test holds them to ClusterOptions):
        # passed on by name, so each is written once here.
        given = {key: value for key, value in locals().items() if key in OPTION_NAMES}
        self.settings = Settings(resolve_options(config_name, **given))
        options = self.settings.options
        # Not given: adapt from 0 once started (a default cluster runs what is submitted).
        self._adapts_by_default = n_workers is None
        n_workers = n_workers or 0
        if n_workers < 0:
            raise OptionError(f"n_workers={n_workers} must be 0 or more")
        if options.tls and kwargs.get("security") is not None:
            raise OptionError(
                "security= and tls=True both set the cluster's TLS: dask-rawvm makes a CA "
                "for each cluster and gives every VM and this client a certificate from it. "
                "Drop security=, or pass tls=False to run plain TCP"
            )
        # files= past its size is an error before anything starts.
        self._files = pack_files(options.files) if options.files else None
        if options.credentials == "forward" and not options.tls:
            logger.warning(
                "credentials='forward' sends AWS credentials over the cluster's TLS connection "
                "only, and tls=False: the VMs get no AWS identity (pass tls=True, or "
                "credentials=None to say so)"
            )
        self._n_workers = n_workers
        self._start_wait = workers_to_wait_for(options.wait_for_workers, n_workers)
        self.cluster_name = options.name or f"rawvm-{uuid.uuid4().hex[:8]}"
        # What dask-rawvm logs about this cluster: get_logs()["Cluster"].
        self._own_log = ClusterLog(self.cluster_name)
        self._own_log.attach()
        weakref.finalize(self, self._own_log.detach)
        self.ledger = Ledger()
        self.session = ProviderSession(
            provider_for(options, self.cluster_name), self.cluster_name, self.ledger
        )
        self.limits = Limits(self.settings, self.session, self.ledger)
        #: Forwards this client's AWS identity to the VMs (``credentials="forward"``).
        self.credentials = (
            CredentialForwarder(self.session) if self.settings.forwards_credentials else None
        )
        self.limits.check(n_workers, 0)
        if not kwargs.get("shutdown_on_close", True):
            self.session.unopened.check_outlives_client()
        self.store = ClusterStore(self.cluster_name, self.session)
        self.launcher = Launcher(
            self.cluster_name,
            self.settings,
            self.session,
            self.store,
            self.ledger,
            # Weakly: the launcher's callbacks reach the provider, which the finalizer
            # below holds; a strong one would keep a dropped cluster alive.
            on_gave_up=_weakly(self._forget_unlaunched),
        )
        self.watch = BootWatch(self.session, self.ledger)
        self._report = Reporter()
        self.names = WorkerNames()
        self._running: RunningCluster | None = None  # the cluster reconnected to, if any
        self._environment_check: EnvironmentCheck | None = None
        self._worker_check: asyncio.Future[EnvironmentMismatch | None] | None = None
        self._started_workers = False  # start has waited for its workers (or does not)
        self._launched: set[str] = set()
        self._default_adaptive: Adaptive | None = None  # adapting for want of n_workers
        worker = {"cls": WorkerVM, "options": {"launcher": self.launcher, "ledger": self.ledger}}
        workers = {self.names.take(): worker for _ in range(n_workers)}
        # An unclosed cluster's VMs are terminated at garbage collection or exit, by the
        # provider's own synchronous means (the event loop may be gone by then).
        self._finalizer = weakref.finalize(self, self.session.sweep_blocking)
        # Quiet like LocalCluster: an in-process scheduler's INFO lines stay in its logs.
        kwargs.setdefault("silence_logs", logging.WARN)
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
            try:
                self._loop_runner.stop()
            except Exception as e:
                logger.warning(
                    "stopping the event loop of failed cluster %s: %s", self.cluster_name, e
                )
            raise

    @property
    def options(self) -> ClusterOptions:
        """The options the cluster runs with (the worker types as preflight chose them)."""
        return self.settings.options

    @property
    def provider(self) -> Provider:
        """Where the cluster's machines come from (started with the cluster)."""
        return self.session.unopened

    def _scheduler_spec(self) -> dict[str, Any]:
        if self.options.scheduler == "local":
            options: dict[str, Any] = {
                "host": self.session.unopened.in_process_scheduler_host,
                "dashboard_address": ":0",
                "protocol": self.settings.scheme,
                "preload": ["dask_rawvm.bulk_retire"],  # as on a scheduler VM
            }
            return {"cls": Scheduler, "options": options}
        options = {
            "settings": self.settings,
            "launcher": self.launcher,
            "watch": self.watch,
            "store": self.store,
            "report": self._report,
        }
        return {"cls": SchedulerVM, "options": options}

    def new_worker_spec(self) -> dict[str, Any]:
        """The next worker: a name never used before in this cluster."""
        return {self.names.take(): self.new_spec}

    # -- start and stop -------------------------------------------------------------
    async def _start(self) -> None:
        about(self.cluster_name)
        if self.session.is_open or self.status != Status.created:
            await super()._start()
            return
        progress = Progress(f"RawVMCluster {self.cluster_name}", self.options.progress)
        with self._report.showing(progress):
            try:
                progress.update(stage="checking the machines and building the environment")
                await self._open_provider()
            except BaseException:
                self.status = Status.failed
                raise
            await super()._start()
            await self._guard_log_volume()
            if self._running is not None and self._running.workers:
                await self._adopt_workers(self._running)
            self._offer_security()
            progress.update(stage=f"scheduler ready at {self.scheduler_address}")
            await self._deliver_data()
            await self._start_workers(progress)
            if self._adapts_by_default and not self.worker_spec:
                self._adapt_by_default()

    def _adapt_by_default(self) -> None:
        """With no ``n_workers``, adapt between 0 and ``max_workers`` (10 if not set): a
        default cluster runs what is submitted, and costs nothing idle."""
        maximum = self.options.max_workers or DEFAULT_ADAPT_MAXIMUM
        self._default_adaptive = self.adapt(minimum=0, maximum=maximum)
        logger.info(
            "%s adapts between 0 and %s workers (no n_workers given; scale or adapt to choose)",
            self.cluster_name,
            self._default_adaptive.maximum,
        )

    async def _guard_log_volume(self) -> None:
        """Workers count their loggers' records; the client warns about a loud one
        (:mod:`dask_rawvm.log_guard`)."""
        threshold = self.options.log_rate_warning
        comm = self.scheduler_comm
        if threshold is None or comm is None:
            return
        await comm.register_worker_plugin(
            plugin=plugin_bytes(threshold), name=LOG_TOPIC, idempotent=True
        )
        alarm = LogRateAlarm(partial(comm.events, topic=LOG_TOPIC), threshold)

        async def poll() -> None:
            try:
                await alarm.poll()
            except OSError as e:  # the scheduler going away says so elsewhere
                logger.debug("reading %s: %s", LOG_TOPIC, e)

        callback = PeriodicCallback(poll, LOG_POLL_SECONDS * 1000)
        self.periodic_callbacks[LOG_TOPIC] = callback
        callback.start()

    async def _start_workers(self, progress: Progress) -> None:
        """Check the scheduler VM's environment, launch the first workers and wait for those
        ``wait_for_workers`` asks for (and for the first one's environment check).

        Workers the cloud has no capacity for yet are not waited for: the cluster runs
        with what it got and keeps asking in the background. On a timeout (or a VM dead
        at boot) the cluster closes, terminating what it launched, and raises.
        """
        try:
            await self._check_environment("scheduler")
            await self._correct_state()
            if not self._start_wait:
                return
            progress.update(stage=f"waiting for {self._start_wait} workers to connect")
            async with self._present_while_starting():
                await self._await_workers(
                    lambda: min(self._start_wait, len(self.workers) - len(self.launcher.waiting)),
                    self.options.worker_start_timeout,
                    progress,
                    fix="pass wait_for_workers=False (or a count, or a fraction) to return "
                    "sooner, or a longer worker_start_timeout",
                )
            if self._worker_check is not None:
                # The first worker's environment is compared before start returns: a
                # mismatch fails the constructor, as the scheduler VM's does.
                mismatch = await self._worker_check
                if mismatch is not None:
                    raise mismatch
        except BaseException:
            # The constructor fails, so nobody holds this cluster to reconnect to or close
            # it: terminate what it launched, even with shutdown_on_close=False.
            self.shutdown_on_close = True
            await self._close()
            raise
        finally:
            self._started_workers = True

    def _present_while_starting(self) -> contextlib.AbstractAsyncContextManager[object]:
        """A client of the start's own while it waits for workers: the scheduler VM shuts
        down after ``idle_timeout`` with no client (:mod:`dask_rawvm.idle_shutdown`), and the
        user's client does not exist yet. (A client, not the cluster's watch connection:
        the scheduler sees a client's connection end when this process dies, and a watch
        connection only at its next worker event.)"""
        if self.options.scheduler != "vm":
            return contextlib.nullcontext()
        return self._own_client()

    def _own_client(self) -> Client:
        """An asynchronous client of the cluster's own, never the default one: the user's
        ``get_client()`` stays the one ``compute`` uses."""
        return Client(
            self.scheduler_address,
            security=self.security,
            asynchronous=True,
            set_as_default=False,
        )

    async def _deliver_data(self) -> None:
        """Before the first worker launches, hand the scheduler what every worker gets at
        its start: the forwarded AWS credentials and ``files=``."""
        assert self.scheduler_comm is not None
        if self.credentials is not None:
            await self.credentials.start(self.scheduler_comm)
        if self._files is not None:
            await ship_files(self.scheduler_comm, self._files)

    @property
    def storage_options(self) -> dict[str, Any]:
        """``storage_options`` for this process to reach the S3 the VMs reach, as
        ``dd.read_parquet(url, storage_options=cluster.storage_options)``: the local
        cloud's S3 (its endpoint and keys) on the local cloud, ``{}`` on AWS. The VMs need
        none: their S3 is found the standard way (``AWS_ENDPOINT_URL_S3`` on the local
        cloud's VMs)."""
        return dict(self.session.unopened.storage_options)

    def upload(self, path: str) -> Any:
        """Put a small local file or directory in every worker's working directory (under
        its path relative to the current directory), workers added later included.

        Raises
        ------
        OptionError
            For a path that does not exist, or one over 10 MiB.
        """
        archive = pack_files([path])

        async def ship() -> None:
            assert self.scheduler_comm is not None
            await ship_files(self.scheduler_comm, archive)

        return self.sync(ship)

    def _offer_security(self) -> None:
        """Let a ``Client(address)`` of this process connect without ``security=``."""
        if self.options.tls:
            addresses = {
                self.scheduler_address,
                getattr(self.scheduler, "contact_address", None),
                getattr(self.scheduler, "address", None),
            }
            offer_security(self, addresses)

    async def _open_provider(self) -> None:
        """Open the provider and check everything before anything launches; on any error,
        remove what was made meanwhile (the bundle's bucket) and close it again."""
        try:
            await self.session.open()
            self.session.provider.check_capacity(self._n_workers)
            if self.options.name is not None:
                self._running = await self.session.find_running()
                if self._running is not None and self.options.scheduler == "vm":
                    self.scheduler_spec["options"]["machine"] = self._running.scheduler
            await preflight(self.session, self.settings, self.store, self.limits, self._n_workers)
            await check_data_regions(self.session, self.options)
            self._describe_workers()
            await self._prepare_tls()
        except BaseException:
            await self.session.close(terminate=True)
            raise

    def _describe_workers(self) -> None:
        """Put the workers' threads and memory (their type's, now known) in their spec."""
        shape = worker_shape(self.options, self.session.provider)
        if shape is None:
            return
        assert self.new_spec is not None
        spec = {**self.new_spec, "options": {**self.new_spec["options"], **shape.spec_options()}}
        self.new_spec = spec
        for name in self.worker_spec:
            if name not in self.workers:
                self.worker_spec[name] = spec

    async def _prepare_tls(self) -> None:
        """The cluster's certificates: new ones, or those of the cluster we reconnect to."""
        if not self.options.tls:
            return
        if self._running is not None:
            self.security = await self.store.reuse_tls()
        else:
            self.security = await self.store.create_tls()
        if self.options.scheduler == "local":
            # The in-process scheduler presents the scheduler VM role's certificate.
            self.scheduler_spec["options"]["security"] = self.store.scheduler_security

    async def _adopt_workers(self, running: RunningCluster) -> None:
        """Take over the workers of the running cluster we reconnected to.

        Workers are matched to their VMs by address; the spec becomes the adopted
        workers, topped up to ``n_workers`` with fresh names.
        """
        assert self.scheduler_comm is not None
        identity = await self.scheduler_comm.identity()
        by_ip = {m.private_ip: m for m in running.workers}
        contact = getattr(self.scheduler, "contact_address", None) or self.scheduler_address
        adopted: dict[str, WorkerVM] = {}
        for address, info in identity.get("workers", {}).items():
            name = str(info.get("name"))
            machine = by_ip.get(get_address_host(address))
            if machine is None or not is_worker_name(name):
                continue
            adopted[name] = WorkerVM.adopt(contact, name, self.launcher, self.ledger, machine)
            self.names.seen(name)
        fresh = max(0, self._n_workers - len(adopted))
        self.worker_spec = {name: self.new_spec for name in adopted}
        self.worker_spec.update({self.names.take(): self.new_spec for _ in range(fresh)})
        self.workers.update(adopted)
        self._launched.update(adopted)
        logger.info("reconnected to %s: adopted workers %s", self.cluster_name, sorted(adopted))

    async def _close(self) -> None:
        checking = self._worker_check
        if checking is not None and checking is not asyncio.current_task():
            checking.cancel()  # a check still running has nothing left to check
        withdraw_security(self)
        if not self.shutdown_on_close and self.status == Status.running:
            if self.credentials is not None:
                self.credentials.stop(self.options.idle_timeout)
            await self._disconnect()
            return
        about(self.cluster_name)
        if self.credentials is not None:
            self.credentials.stop()
        try:
            await super()._close()
        finally:
            leftovers = await self.session.close(terminate=True)
            if leftovers:
                logger.info("terminated %d leftover VM(s) of %s", len(leftovers), self.cluster_name)
            self._finalizer.detach()
            self._own_log.detach()

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
        await self.session.close(terminate=False)
        self._finalizer.detach()
        logger.info("left cluster %s running (shutdown_on_close=False)", self.cluster_name)
        self._own_log.detach()
        await Cluster._close(self)

    # -- scaling ---------------------------------------------------------------------
    def scale(self, n: int = 0, memory: str | None = None, cores: int | None = None) -> Any:
        """Scale to ``n`` workers, or enough for ``memory`` and ``cores`` (as SpecCluster
        does, by the workers' threads and memory limit); scaling down moves data off the
        removed workers first.

        The workers removed are those not yet connected, then those holding the
        least data. A cluster adapting because it was made without ``n_workers`` stops
        adapting (as distributed's scaling widget does).
        """
        if memory is not None:
            n = max(n, math.ceil(parse_bytes(memory) / self._memory_per_worker()))
        if cores is not None:
            n = max(n, math.ceil(cores / self._threads_per_worker()))
        adaptive = self._adapting_by_default()
        if adaptive is not None:
            # The user's own count ends the adapting a cluster without n_workers does.
            adaptive.stop()
        return self._scale_to(n)

    def _adapting_by_default(self) -> Adaptive | None:
        """The Adaptive of a cluster made without ``n_workers``, while it runs."""
        adaptive = self._default_adaptive
        if adaptive is self._adaptive and adaptive is not None and adaptive.state != "stopped":
            return adaptive
        return None

    def _scale_to(self, n: int) -> Any:
        """Scale to ``n`` workers: ``scale``'s and ``RawVMAdaptive``'s way."""
        self.limits.check(n, len(self.worker_spec))
        self._order_by_value()
        return super().scale(n)

    def _threads_per_worker(self) -> int:
        """Threads of a new worker, as its spec says (its type's vCPUs, or worker_nthreads)."""
        nthreads = self._new_worker_option("nthreads", "cores=")
        return int(nthreads)

    def _memory_per_worker(self) -> int:
        """Memory limit of a new worker, as its spec says."""
        limit = int(self._new_worker_option("memory_limit", "memory="))
        if not limit:
            raise OptionError(
                "scaling by memory needs the workers' memory limit, and worker_memory_limit=0 "
                "gives them none: scale by n or cores=, or set worker_memory_limit"
            )
        return limit

    def _new_worker_option(self, key: str, scaling: str) -> Any:
        options = (self.new_spec or {}).get("options", {})
        if key not in options:
            raise OptionError(
                f"scaling by {scaling} needs the workers' {key}, which comes from their "
                "instance type once the cluster started: start it first (await it, or "
                "create it without asynchronous=True), or pass worker_nthreads= and "
                "worker_memory_limit= (bytes)"
            )
        return options[key]

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
            key=lambda n: (n not in managed, -managed.get(n, 0), worker_index(n)),
        )
        self.worker_spec = {name: self.worker_spec[name] for name in order}

    async def _correct_state_internal(self) -> None:
        about(self.cluster_name)
        to_close = set(self.workers) - set(self.worker_spec)
        if to_close and self.status == Status.running and self.scheduler_comm is not None:
            kept = await self._retire(to_close)
            for name in kept:  # still holding data nobody could take: keep its VM
                self.worker_spec[name] = self.new_spec
            # Closed (terminated, in one call) here: SpecCluster would first retire them
            # again, by addresses it does not have, in an RPC that waits behind the
            # scheduler's removals of the first (1.5 s at N = 1000, measured).
            retired = sorted(to_close - kept)
            await asyncio.gather(*(self.workers[name].close() for name in retired))
            for name in retired:
                del self.workers[name]
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

    # -- the environment on the VMs ------------------------------------------------------
    @property
    def environment_check(self) -> EnvironmentCheck:
        """The fidelity check of this cluster's VMs (``environment_check=``): its reports."""
        if self._environment_check is None:
            expected = {role: bundle.expected for role, bundle in self.store.bundles.items()}
            self._environment_check = EnvironmentCheck(self.options.environment_check, expected)
        return self._environment_check

    async def _check_environment(self, role: str, worker: tuple[str, str] | None = None) -> None:
        """Compare a VM of ``role`` (a worker: its address and name) with this process; on a
        mismatch in ``"error"`` mode, raise :class:`EnvironmentMismatch` naming each package
        (the caller closes the cluster)."""
        check = self.environment_check
        if not check.wants(role) or (role == "scheduler" and self.options.scheduler != "vm"):
            return
        async with self._own_client() as client:
            if worker is None:
                await check.scheduler(client)
            else:
                await check.worker(client, *worker)

    def _worker_joined(self, address: str, name: str) -> None:
        """The first worker to connect is checked: awaited by start when it waits for
        workers, else in the background."""
        if not self.environment_check.wants("worker") or self._worker_check is not None:
            return

        # While start waits for workers it raises what the check finds; after, it is logged.
        raise_at_start = not self._started_workers

        async def check() -> EnvironmentMismatch | None:
            try:
                await self._check_environment("worker", (address, name))
            except EnvironmentMismatch as mismatch:
                if raise_at_start:
                    return mismatch
                logger.error("%s\nThe cluster is closed.", mismatch)
                await self._close()
            except Exception as e:  # a check that could not run is not a verdict
                if self.status == Status.running:  # (closing: the worker went with it)
                    logger.warning("could not compare worker %s's environment: %s", name, e)
            return None

        self._worker_check = asyncio.ensure_future(check())

    def _update_worker_status(self, op: str, msg: Any) -> None:
        if op == "add":
            for address, info in msg.get("workers", {}).items():
                self._worker_joined(address, str(info.get("name", address)))
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
            self.worker_spec[self.names.take()] = spec
            self._launched.discard(name)
            self.launcher.replace_lost(name)

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
        minimum: float | None = None,
        maximum: float | None = None,
        minimum_cores: int | None = None,
        maximum_cores: int | None = None,
        minimum_memory: str | None = None,
        maximum_memory: str | None = None,
        **kwargs: Any,
    ) -> Adaptive:
        """Scale between ``minimum`` and ``maximum`` workers with the load.

        Same parameters as :meth:`distributed.deploy.spec.SpecCluster.adapt`; the
        default :class:`RawVMAdaptive` gives idle VMs back within seconds and
        terminates only workers that retired. What is not given comes from
        ``distributed.adaptive.*`` (``minimum``, ``maximum``, ``interval``,
        ``wait-count``, ``target-duration``), as for any Adaptive. ``maximum`` is
        clamped to ``max_workers``, the provider's capacity and what
        ``max_hourly_cost`` allows.
        """
        if minimum is None:
            minimum = dask.config.get("distributed.adaptive.minimum")
        if maximum is None:
            maximum = dask.config.get("distributed.adaptive.maximum")
        maximum = self.limits.adapt_maximum(maximum, len(self.workers))
        if not math.isinf(maximum):
            maximum = int(maximum)  # distributed's Adaptive takes an int or inf
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
        shape = WorkerShape.from_spec((self.new_spec or {}).get("options", {}))
        return self.sync(
            self.launcher.worker_user_data, contact, [self.names.next_name], shape=shape
        )

    async def _get_logs(
        self, cluster: bool = True, scheduler: bool = True, workers: Any = True
    ) -> Logs:
        """Logs keyed as distributed keys them: ``"Cluster"``, ``"Scheduler"`` and each
        worker's address (a worker whose VM has not connected yet: its name).

        A VM's log is its boot log (the bootstrap, then its Dask process's output); an
        in-process scheduler's is its own log. ``workers`` is True, or a list of worker
        addresses or names.
        """
        logs = Logs()
        if cluster:
            lines = [*self._cluster_manager_logs, *self._own_log.records]
            logs["Cluster"] = Log("\n".join(line for _, line in sorted(lines)))
        if scheduler:
            logs["Scheduler"] = Log(await self._scheduler_log())
        if workers:
            logs.update(await self._worker_logs(None if workers is True else list(workers)))
        return logs

    async def _scheduler_log(self) -> str:
        machine = getattr(self.scheduler, "machine", None)
        if machine is not None:
            return await self.watch.console_output(machine.id)
        assert self.scheduler_comm is not None
        lines = await self.scheduler_comm.get_logs()
        return "\n".join(line for _, line in lines)

    async def _worker_logs(self, wanted: list[str] | None) -> dict[str, Log]:
        assert self.scheduler_comm is not None
        self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity())
        address_of = {str(w["name"]): a for a, w in self.scheduler_info["workers"].items()}
        name_of = {a: n for n, a in address_of.items()}
        logs: dict[str, Log] = {}
        elsewhere = []  # connected workers that are not this cluster's VMs
        for key in list(self.workers) if wanted is None else wanted:
            name = name_of.get(key, key)  # an address, or a name
            machine = getattr(self.workers.get(name), "machine", None)
            if machine is not None:
                text = await self.watch.console_output(machine.id)
                logs[address_of.get(name, name)] = Log(text)
            elif name in address_of:
                elsewhere.append(address_of[name])
        if elsewhere:
            found = await self.scheduler_comm.worker_logs(workers=elsewhere)
            for address, lines in found.items():
                logs[address] = Log("\n".join(line for _, line in lines))
        return logs

    async def _wait_for_workers(self, n_workers: int = 0, timeout: Any = None) -> None:
        """Wait for ``n_workers`` running workers, showing the VMs' progress.

        A worker VM dead at boot is an error with its log, not a hang; a timeout is
        distributed's ``WorkerStartTimeoutError`` (a
        :class:`~dask_rawvm.errors.WorkerBootTimeoutError`) saying what each missing VM
        was doing.
        """
        if self._adapting_by_default() is not None and n_workers > len(self.worker_spec):
            logger.warning(
                "waiting for %d workers, but %s adapts to the work submitted (made without "
                "n_workers) and has %d: submit work, or scale(%d) first",
                n_workers,
                self.cluster_name,
                len(self.worker_spec),
                n_workers,
            )
        progress = Progress(
            f"{self.cluster_name}: waiting for {n_workers} workers", self.options.progress
        )
        try:
            await self._await_workers(
                lambda: n_workers,
                parse_timedelta(timeout) if timeout else None,
                progress,
                fix="scale up, or wait longer",
            )
        finally:
            progress.close()

    async def _await_workers(
        self,
        wanted: Callable[[], int],
        timeout: float | None,
        progress: Progress,
        fix: str,
    ) -> None:
        """Poll the scheduler until ``wanted()`` workers are running, or raise."""
        deadline = time.monotonic() + timeout if timeout else None
        checked, booted = time.monotonic(), 0
        while True:
            assert self.scheduler_comm is not None
            self.scheduler_info = SchedulerInfo(await self.scheduler_comm.identity())
            connected = {
                str(w["name"])
                for w in self.scheduler_info["workers"].values()
                if w.get("status", Status.running.name) == Status.running.name
            }
            target = wanted()
            progress.update(
                vms=card.vm_summary(self.ledger.live()),
                requested=len(self.workers),
                running=max(booted, len(connected)),
                connected=len(connected),
            )
            if len(connected) >= target:
                return
            waiting = {n: w.machine for n, w in self.workers.items() if n not in connected}
            booting = [m for m in waiting.values() if m is not None]
            if time.monotonic() - checked > 3:
                checked = time.monotonic()
                described = await self.watch.raise_if_dead(booting)
                booted = len(connected) + sum(m.state == "running" for m in described)
            if deadline is not None and time.monotonic() > deadline:
                assert timeout is not None
                raise WorkerBootTimeoutError(
                    len(connected),
                    target,
                    timeout,
                    await self.watch.describe_waiting(waiting, self.launcher.waiting),
                    fix,
                )
            await asyncio.sleep(0.25)

    @property
    def cost_per_hour(self) -> float:
        """Estimated USD per hour of the VMs running now (list prices)."""
        return self.ledger.cost_per_hour()

    @property
    def spent(self) -> float:
        """Estimated USD spent on this cluster's VMs so far (per second, 60 s minimum)."""
        return self.ledger.spent()

    def cost_report(self) -> CostReport:
        """What the cluster has spent so far by market and VM type, and spends now per hour
        (``print(cluster.cost_report())`` for a table). A client that reconnected to a
        running cluster counts its VMs from their launch."""
        return CostReport.of(self.ledger.meter)

    def _connected(self) -> dict[str, Any]:
        info = self.scheduler_info or {}
        return dict(info.get("workers", {}))

    def __repr__(self) -> str:
        # distributed's Cluster.__repr__ first (name, address, workers, threads, memory),
        # then the VMs.
        workers = self._connected()
        text = (
            f"RawVMCluster({self.cluster_name!r}, {self.scheduler_address!r}, "
            f"workers={len(workers)}, threads={sum(w['nthreads'] for w in workers.values())}"
        )
        memory = [w.get("memory_limit") for w in workers.values()]
        if memory and all(memory):
            text += f", memory={format_bytes(sum(memory))}"
        return (
            f"{text}, provider={self.options.provider!r}, requested={len(self.workers)}"
            f"{self._waiting_note()}, status={self.status.name}, "
            f"vms=[{card.vm_summary(self.ledger.live())}], cost=${self.cost_per_hour:.3f}/h)"
        )

    def _waiting_note(self) -> str:
        waiting = len(self.launcher.waiting)
        return f" ({waiting} waiting for capacity)" if waiting else ""

    def _worker_machines(self) -> dict[str, Machine]:
        """The VM of each worker launched, by name."""
        machines = {name: getattr(w, "machine", None) for name, w in self.workers.items()}
        return {name: machine for name, machine in machines.items() if machine is not None}

    def workers_by_state(self) -> dict[str, list[str]]:
        """Worker names by where they are, from what this client knows (no cloud call).

        ``connected`` (running on the scheduler), ``retiring`` (connected, on their way
        out, or paused), ``booting`` (a VM launched, not connected yet), ``waiting for
        capacity`` (no VM yet: the cloud had none, asked again in the background) and
        ``not launched`` (asked for, not yet sent to the cloud).
        """
        return self._workers_by_state(self._worker_machines())

    def _workers_by_state(self, machines: dict[str, Machine]) -> dict[str, list[str]]:
        """:meth:`workers_by_state`, given :meth:`_worker_machines`."""
        status = {
            str(info.get("name")): info.get("status", Status.running.name)
            for info in self._connected().values()
        }
        return card.workers_by_state(
            {*self.worker_spec, *self.workers},
            status,
            set(self.launcher.waiting),
            machines,
        )

    def _repr_html_(self, cluster_status: Any = None) -> str:
        """distributed's cluster card (dashboard link, workers, threads, memory, scheduler
        info) with the VMs: workers by state, types, markets and zones, $/h and spent,
        the environment's notes and the cluster's status.

        Also what distributed's notebook widget shows (``_ipython_display_``, with
        ipywidgets installed), refreshed every ``distributed.deploy.cluster-repr-interval``.
        """
        region = self.options.region or "default region"
        live = self.ledger.live()
        zones = sorted({m.zone for m in live if m.zone})
        machines = self._worker_machines()
        states = self._workers_by_state(machines)
        counts = ", ".join(f"{len(names)} {state}" for state, names in states.items() if names)
        spent = card.spent_by_line(self.cost_report())
        rows = [
            ("Scheduler", html.escape(str(self.scheduler_address))),
            ("Provider", html.escape(f"{self.options.provider} ({region})")),
            ("Workers requested", f"{len(self.workers)}{html.escape(self._waiting_note())}"),
            ("Worker states", html.escape(counts or "none")),
            ("VMs", html.escape(card.vm_summary(live) or "none")),
            ("Zones", html.escape(", ".join(zones) or "none")),
            ("Cost", f"${self.cost_per_hour:.3f}/h now, ${self.spent:.2f} spent"),
            ("Spent by market and type", html.escape(spent or "nothing yet")),
            ("Status", self.status.name),
        ]
        # Not the property: a repr must not build the check before the bundles are all made.
        check = self._environment_check
        notes = card.environment_notes(
            self.store.bundles,
            check.reports if check is not None else {},
            self.options.environment_check,
        )
        ours = card.card_rows(rows, notes, card.workers_table(states, machines))
        return super()._repr_html_(cluster_status=ours + (cluster_status or ""))

    def _scaling_status(self) -> str:
        """distributed's Scaling tab (mode, workers) with the limits a scale-up meets."""
        limits = card.limits_row(self.options.max_workers, self.options.max_hourly_cost)
        return super()._scaling_status().replace("</table>", f"{limits}</table>")


def _weakly(method: Callable[..., Any]) -> Callable[..., None]:
    """``method``, called only while its object lives (and holding it weakly)."""
    ref = weakref.WeakMethod(method)

    def call(*args: Any) -> None:
        live = ref()
        if live is not None:
            live(*args)

    return call
