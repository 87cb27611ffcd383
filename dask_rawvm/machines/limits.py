"""How many workers a cluster may have: ``max_workers``, the provider's capacity, the budget."""

from __future__ import annotations

import logging
import math

from dask_rawvm.cost import affordable_count, check_budget
from dask_rawvm.errors import OptionError
from dask_rawvm.machines.ledger import Ledger
from dask_rawvm.machines.session import ProviderSession
from dask_rawvm.machines.settings import Settings

logger = logging.getLogger(__name__)


class Limits:
    """Refuses a size before anything launches, and clamps adapt's maximum.

    Parameters
    ----------
    settings
        ``max_workers``, ``max_hourly_cost``, the worker and scheduler types.
    session
        The provider: its capacity and prices (once open).
    ledger
        What runs now, and what it costs.
    """

    def __init__(self, settings: Settings, session: ProviderSession, ledger: Ledger) -> None:
        self.settings = settings
        self.session = session
        self.ledger = ledger

    def check(self, n: int, spec_size: int) -> None:
        """Refuse ``n`` workers over ``max_workers``, the provider's capacity or the budget.

        ``spec_size`` is how many workers the cluster asks for now (what ``n`` adds to).

        Raises
        ------
        OptionError
            Over ``max_workers`` (a ValueError).
        ProviderError
            Over what the provider can run at once.
        BudgetExceeded
            When the estimate would pass ``max_hourly_cost``.
        """
        limit = self.settings.options.max_workers
        if limit is not None and n > limit:
            raise OptionError(
                f"asked for {n} workers, over max_workers={limit}: ask for fewer, or raise "
                "max_workers (in the call or the rawvm config)"
            )
        if self.session.is_open:
            self.session.provider.check_capacity(n)
            self.check_budget(n, spec_size)

    def check_budget(self, n: int, spec_size: int) -> None:
        """Refuse a size whose estimated cost would pass ``max_hourly_cost``; say the estimate."""
        options = self.settings.options
        provider = self.session.provider
        worker_price = self.worker_price()
        running = self.ledger.cost_per_hour()
        if self.ledger.meter.running():
            added = worker_price * max(0, n - spec_size)
        else:  # nothing launched yet: the scheduler VM is part of what is about to be
            scheduler = options.scheduler == "vm"
            added = worker_price * n + (
                sum(
                    provider.hourly_costs(
                        options.scheduler_vm_type, "on-demand", "scheduler"
                    ).values()
                )
                if scheduler
                else 0
            )
        if added:
            logger.info("estimated cost: +$%.3f/h (now $%.3f/h)", added, running)
        check_budget(running, added, options.max_hourly_cost)

    def worker_price(self) -> float:
        """USD per hour of a worker VM at worst: the dearest candidate type, on-demand, with
        what else the cloud bills for it (its disk, its public address)."""
        options = self.settings.options
        types = options.worker_vm_types or [options.worker_vm_type]
        provider = self.session.provider
        return max(sum(provider.hourly_costs(t, "on-demand", "worker").values()) for t in types)

    def adapt_maximum(self, maximum: float, workers: int) -> float:
        """``maximum`` clamped to ``max_workers``, capacity and what the budget allows on top
        of the ``workers`` the cluster has."""
        ceiling = float(self.settings.options.max_workers or math.inf)
        if self.session.is_open:
            provider = self.session.provider
            ceiling = min(ceiling, provider.capacity)
            more = affordable_count(
                self.ledger.cost_per_hour(),
                self.worker_price(),
                self.settings.options.max_hourly_cost,
            )
            if more is not None:
                ceiling = min(ceiling, workers + more)
        if maximum > ceiling:
            logger.info(
                "adapt maximum %s clamped to %s (max_workers, capacity, budget)", maximum, ceiling
            )
            return ceiling
        return maximum
