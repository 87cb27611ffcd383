"""The cluster's side of data on the VMs: forwarding the client's AWS identity, shipping
small files, and the region of the buckets it names (see :mod:`dask_rawvm.data` for the
VMs' side).

Everything reaches the VMs through the scheduler, over the cluster's (TLS) connection, as
plugins: the scheduler keeps the latest worker plugin and hands it to every worker that
joins, before the worker runs a task.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from typing import Any

from distributed.protocol.pickle import dumps

from dask_rawvm.config import ClusterOptions, split_s3_url
from dask_rawvm.data import (
    CREDENTIALS_PLUGIN,
    ForwardedCredentials,
    SchedulerCredentials,
    ShippedFiles,
    WorkerCredentials,
)
from dask_rawvm.machines.session import ProviderSession

logger = logging.getLogger(__name__)

#: How long forwarded credentials last: STS GetSessionToken's default, 12 h. The client
#: refreshes them at half their life, so a VM always holds some with 6 h or more left while a
#: client is connected; with none, they run out within 12 h. (Tests shorten it.)
LIFETIME = 12 * 3600.0
#: After a failed refresh, the next try: soon, as the credentials on the VMs keep running out.
RETRY_SECONDS = 30.0
#: EC2's documented price of data transferred between US regions (Amazon EC2 On-Demand
#: pricing page, "Data Transfer OUT From Amazon EC2 To ... another AWS Region"): charged to
#: the bucket's account for what leaves its region.
CROSS_REGION_USD_PER_GB = 0.02


async def register_worker_plugin(scheduler: Any, plugin: Any, name: str) -> None:
    """Register ``plugin`` on every worker and every worker to come; a worker that could not
    take it (e.g. an image without dask_rawvm) is logged."""
    responses = await scheduler.register_worker_plugin(
        plugin=dumps(plugin), name=name, idempotent=False
    )
    for worker, response in (responses or {}).items():
        if response.get("status") != "OK":
            logger.warning(
                "worker %s could not take %s: %s", worker, name, response.get("exception")
            )


class CredentialForwarder:
    """Forwards this client's AWS identity to the scheduler and every worker, refreshing it at
    half its life while the cluster is connected.

    Parameters
    ----------
    session
        The cluster's provider, which makes the credentials.
    lifetime
        How long each forwarded set lasts (seconds).
    """

    def __init__(self, session: ProviderSession, lifetime: float | None = None) -> None:
        self.session = session
        self.lifetime = LIFETIME if lifetime is None else lifetime
        #: What was forwarded last, and how many times.
        self.latest: ForwardedCredentials | None = None
        self.forwarded = 0
        self._task: asyncio.Task[None] | None = None

    async def start(self, scheduler: Any) -> None:
        """Forward the first credentials (a failure is logged: the cluster runs without),
        then keep refreshing them in the background."""
        try:
            await self.forward(scheduler)
        except Exception as e:
            logger.warning("the VMs get no AWS credentials: %s", e)
        self._task = asyncio.create_task(self._refresh(scheduler))

    async def forward(self, scheduler: Any) -> ForwardedCredentials | None:
        """Make fresh credentials and hand them to the scheduler, and through it to every
        worker present and to come."""
        credentials = await self.session.provider.forward_credentials(self.lifetime)
        if credentials is None:
            return None
        await scheduler.register_scheduler_plugin(
            plugin=dumps(SchedulerCredentials(credentials)),
            name=CREDENTIALS_PLUGIN,
            idempotent=False,
        )
        await register_worker_plugin(scheduler, WorkerCredentials(credentials), CREDENTIALS_PLUGIN)
        self.latest = credentials
        self.forwarded += 1
        logger.info(
            "forwarded AWS credentials %s to the VMs, valid %.0f s",
            credentials.access_key_id,
            credentials.expires_in(),
        )
        return credentials

    async def _refresh(self, scheduler: Any) -> None:
        while True:
            left = self.latest.expires_in() if self.latest is not None else 0.0
            # Half their life; after a failure, half of what is left (sooner and sooner).
            await asyncio.sleep(left / 2 if left > 2 else RETRY_SECONDS)
            try:
                await self.forward(scheduler)
            except Exception as e:  # the VMs keep what they have; try again
                logger.warning("could not refresh the VMs' AWS credentials: %s", e)

    def stop(self, idle_timeout: float | None = None) -> None:
        """Stop refreshing; with the ``idle_timeout`` of a cluster left running, warn when
        the credentials the VMs hold run out before it would shut down."""
        if self._task is not None:
            self._task.cancel()
            self._task = None
        if idle_timeout is None or self.latest is None:
            return
        left = self.latest.expires_in()
        if left < idle_timeout:
            logger.warning(
                "the AWS credentials forwarded to the VMs expire in %.0f min, and with no "
                "client to refresh them the cluster may run idle for up to %.0f min "
                "(idle_timeout): tasks reaching AWS after that fail until a client "
                "reconnects (RawVMCluster(name=...) forwards fresh ones)",
                left / 60,
                idle_timeout / 60,
            )


async def ship_files(scheduler: Any, archive: bytes) -> str:
    """Put an archive of :func:`dask_rawvm.data.pack_files` in every worker's working
    directory, workers to come included; returns the plugin's name (by content)."""
    name = f"dask-rawvm-files-{hashlib.sha256(archive).hexdigest()[:16]}"
    await register_worker_plugin(scheduler, ShippedFiles(archive), name)
    return name


async def check_data_regions(session: ProviderSession, options: ClusterOptions) -> None:
    """Warn about each bucket of ``data=`` in another region than the cluster's, with what
    reading it costs."""
    provider = session.provider
    region = getattr(provider, "region", None)
    if not options.data or region is None:
        return
    buckets = sorted({split_s3_url(url)[0] for url in options.data})
    for bucket in buckets:
        where = await provider.bucket_region(bucket)
        if where is not None and where != region:
            logger.warning(
                "bucket %s is in %s, the cluster in %s: data between regions is billed, "
                "$%.2f/GB between US regions (EC2's list price for inter-region transfer; "
                "more from and to other continents), and slower. Run the cluster in %s "
                "(region=%r) to read it for free",
                bucket,
                where,
                region,
                CROSS_REGION_USD_PER_GB,
                where,
                where,
            )
