"""The one owner of a cluster's provider: opens it, closes it, and sweeps it at exit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from dask_rawvm.errors import CatalogError, ProviderError
from dask_rawvm.machines.ledger import Ledger
from dask_rawvm.providers.base import CLUSTER_TAG, ROLE_TAG, Machine, Provider

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunningCluster:
    """The machines of a cluster already running under this name (to reconnect to)."""

    scheduler: Machine
    workers: list[Machine] = field(default_factory=list)


class ProviderSession:
    """A cluster's provider from :meth:`open` to :meth:`close`: the only code that opens,
    closes or sweeps it; everything else uses :attr:`provider` while it is open.

    Parameters
    ----------
    provider
        Built from the options (:func:`dask_rawvm.providers.provider_for`), not started.
    cluster
        The cluster's name (its tag on every resource).
    ledger
        What the cluster knows it has, for the record of what cleaning up terminated
        and for what a failed cleanup may have left.
    """

    def __init__(self, provider: Provider, cluster: str, ledger: Ledger) -> None:
        self._provider = provider
        self.cluster = cluster
        self.ledger = ledger
        self.is_open = False

    @property
    def provider(self) -> Provider:
        """The provider, while the session is open."""
        if not self.is_open:
            raise ProviderError(
                f"the provider of cluster {self.cluster} is not open (not started, or closed)"
            )
        return self._provider

    @property
    def unopened(self) -> Provider:
        """The provider whether open or not: for what it says without a connection."""
        return self._provider

    async def open(self) -> None:
        """Start the provider (connect, check credentials and region)."""
        await self._provider.start()
        self.is_open = True

    async def find_running(self) -> RunningCluster | None:
        """The cluster of this name if one is running (its scheduler machine is live)."""
        machines = [
            m for m in await self.provider.live_machines(self.cluster) if m.state != "stopped"
        ]
        schedulers = [m for m in machines if m.tags.get(ROLE_TAG) == "scheduler"]
        if not schedulers:
            return None
        self.ledger.adopted(machines, await self._pricing(machines))
        workers = [m for m in machines if m.tags.get(ROLE_TAG) == "worker"]
        return RunningCluster(schedulers[0], workers)

    async def _pricing(self, machines: list[Machine]) -> Callable[[Machine], dict[str, float]]:
        """What each of ``machines`` costs per hour, by part, for the meter: their types
        looked up first (the cluster that launched them knew them; this client may not)."""
        provider = self.provider
        try:
            await provider.choose(sorted({m.vm_type for m in machines}))
        except (CatalogError, ProviderError) as e:  # a provider without a catalog prices anyway
            logger.debug("types of the running cluster's machines: %s", e)

        def costs(machine: Machine) -> dict[str, float]:
            role = machine.tags.get(ROLE_TAG, "worker")
            try:
                return provider.hourly_costs(machine.vm_type, machine.market, role)
            except (KeyError, CatalogError, ProviderError) as e:
                logger.warning(
                    "%s (%s) of the running cluster is not metered: no price for it (%s)",
                    machine.id,
                    machine.vm_type,
                    e,
                )
                return {"instance": 0.0}

        return costs

    async def close(self, *, terminate: bool) -> list[str]:
        """Close the provider; first, with ``terminate``, remove everything of the cluster.

        Never raises: a failure is logged with what may have been left and how to remove
        it, and the provider's connections are released whatever happened.

        Returns
        -------
        list of str
            The machines the cleanup terminated.
        """
        terminated: list[str] = []
        try:
            if terminate and self.is_open:
                terminated = await self._provider.cleanup(self.cluster)
                self.ledger.terminated(terminated)
                self.ledger.all_terminated()
        except Exception as e:
            logger.error(
                "closing cluster %s: cleanup failed: %s; %s", self.cluster, e, self._left()
            )
        finally:
            self.is_open = False
            try:
                await self._provider.close()
            except Exception as e:
                logger.error(
                    "closing cluster %s: releasing the provider failed: %s", self.cluster, e
                )
        return terminated

    def sweep_blocking(self) -> None:
        """At garbage collection or exit of an unclosed cluster: terminate its machines.

        From synchronous code, with the provider's own means
        (:meth:`~dask_rawvm.providers.base.Provider.cleanup_blocking`); logs what it did,
        or what may have been left.
        """
        if not self.is_open:
            return
        self.is_open = False
        try:
            ids = self._provider.cleanup_blocking()
        except Exception as e:
            logger.error(
                "could not clean up unclosed cluster %s: %s; %s", self.cluster, e, self._left()
            )
            return
        if ids:
            logger.info("terminated %d machine(s) of unclosed cluster %s", len(ids), self.cluster)

    def _left(self) -> str:
        live = sorted(m.id for m in self.ledger.live())
        return (
            f"may be left: machines {live or '(none this client knows of)'} and anything "
            f"else tagged {CLUSTER_TAG}={self.cluster}. Fix: remove them with the cloud's "
            f"tools (EC2: `dask-rawvm down {self.cluster}`)"
        )
