"""What a cluster costs: an estimate before launching, a meter while it runs, a budget guard.

Prices come from a provider's catalog (any :class:`PricedType`, such as EC2's
:class:`~dask_rawvm.providers.ec2.catalog.VMType` annotated by its
:class:`~dask_rawvm.providers.ec2.catalog.PriceTable`). EC2 bills Linux instances per second with a
60-second minimum, on-demand and spot alike; the meter counts the same way, from launch
(not from ``running``: a slight over-estimate, which is the safe side for a budget). A
machine's price is what AWS bills for it per hour: the instance, and its root volume and
public IPv4 address (recorded by part, :meth:`CostMeter.cost_per_hour_by_part`), which the
meter bills the same way (EBS too is billed per second with a 60 s minimum).
"""

from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from dask_rawvm.errors import RawVMError
from dask_rawvm.needs import check_market

#: EC2 bills at least this many seconds for each Linux instance launch.
BILLING_MINIMUM_SECONDS = 60.0
#: Rounding slack when comparing a cost with a limit (USD/hour).
_EPSILON = 1e-9


class PricedType(Protocol):
    """A machine type with its prices, as a provider's catalog describes it."""

    @property
    def name(self) -> str: ...

    #: The on-demand price is estimated from the type's shape, not listed.
    @property
    def price_estimated(self) -> bool: ...

    #: The spot price is a live price, not a default discount.
    @property
    def spot_price_live(self) -> bool: ...

    def price(self, market: str) -> float | None:
        """USD per hour on ``market``, when known."""
        ...


#: ``(type, market, count)``: ``count`` instances of ``type`` on ``market``.
PlanItem = tuple[PricedType, str, int]


class BudgetExceeded(RawVMError, RuntimeError):
    """A launch or scale-up would take the cluster over ``max_hourly_cost``.

    Attributes
    ----------
    current, requested, limit
        USD/hour running now, asked for on top, and allowed.
    """

    def __init__(self, message: str, current: float, requested: float, limit: float) -> None:
        super().__init__(message)
        self.current = current
        self.requested = requested
        self.limit = limit


def format_money(amount: float) -> str:
    """``$0.16`` for amounts from 10 cents up, two significant digits below (``$0.042``)."""
    if amount == 0:
        return "$0"
    if abs(amount) >= 0.1:
        return f"${amount:.2f}"
    decimals = 1 - math.floor(math.log10(abs(amount)))
    text = f"{amount:.{decimals}f}".rstrip("0")
    whole, _, fraction = text.partition(".")
    return f"${whole}.{fraction.ljust(2, '0')}"


# -- estimates -----------------------------------------------------------------------------


@dataclass(frozen=True)
class CostLine:
    """``count`` instances of one type on one market."""

    vm_type: str
    market: str
    count: int
    unit_price: float
    #: The price is estimated from the type's shape (not in the price table).
    estimated: bool = False

    @property
    def per_hour(self) -> float:
        return self.unit_price * self.count

    def __str__(self) -> str:
        approx = "~" if self.estimated else ""
        return (
            f"{self.count} x {self.vm_type} {self.market} @ "
            f"{approx}{format_money(self.unit_price)}/h"
        )


@dataclass(frozen=True)
class CostEstimate:
    """The hourly cost of a set of instances, with a human-readable breakdown.

    ``str(estimate)`` reads like
    ``3 x m6i.large spot @ $0.034/h + 1 x t3.medium on-demand @ $0.042/h = $0.14/h``;
    a ``~`` marks prices estimated from vCPUs/memory/GPUs.
    """

    lines: tuple[CostLine, ...]

    @property
    def per_hour(self) -> float:
        """USD per hour for all of it."""
        return sum(line.per_hour for line in self.lines)

    @property
    def estimated(self) -> bool:
        """Whether any price in it is an estimate."""
        return any(line.estimated for line in self.lines)

    def __str__(self) -> str:
        if not self.lines:
            return "nothing = $0/h"
        approx = "~" if self.estimated else ""
        items = " + ".join(str(line) for line in self.lines)
        return f"{items} = {approx}{format_money(self.per_hour)}/h"


def estimate_cost(plan: Iterable[PlanItem]) -> CostEstimate:
    """The hourly cost of ``plan``, line by line.

    Parameters
    ----------
    plan
        ``(vm_type, market, count)`` items; each type must carry prices
        (e.g. :meth:`dask_rawvm.providers.ec2.catalog.PriceTable.annotate`).

    Raises
    ------
    ValueError
        For an unknown market, a negative count or a type without a price.
    """
    lines = []
    for vm, market, count in plan:
        if count < 0:
            raise ValueError(f"{count} x {vm.name}: an instance count cannot be negative")
        if count == 0:
            continue
        price = vm.price(market)
        if price is None:
            raise ValueError(
                f"{vm.name} has no {market} price: annotate it first, e.g. "
                "PriceTable.load(region).annotate(vm)"
            )
        estimated = vm.price_estimated and not (market == "spot" and vm.spot_price_live)
        lines.append(CostLine(vm.name, market, count, price, estimated))
    return CostEstimate(tuple(lines))


def estimate_hourly(plan: Iterable[PlanItem]) -> float:
    """USD per hour for ``plan`` (``(vm_type, market, count)`` items); see :func:`estimate_cost`."""
    return estimate_cost(plan).per_hour


# -- the meter -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Usage:
    """One instance's life, as the meter saw it (times are ``time.time()`` seconds)."""

    instance_id: str
    vm_type: str
    market: str
    hourly_price: float
    launched_at: float
    terminated_at: float | None = None
    #: ``hourly_price`` by what is billed (``instance``, ``storage``, ``public_ipv4``).
    parts: tuple[tuple[str, float], ...] = ()

    def cost(self, now: float, minimum_seconds: float = BILLING_MINIMUM_SECONDS) -> float:
        """USD billed for this instance up to ``now`` (or its termination)."""
        end = self.terminated_at if self.terminated_at is not None else now
        # The minimum is owed as soon as the instance exists, so it counts at once.
        seconds = max(end - self.launched_at, minimum_seconds)
        return self.hourly_price * seconds / 3600.0


class CostMeter:
    """What a cluster has spent so far and is spending now.

    Record every launch and termination; :meth:`spent` bills each instance per
    second with a 60 s minimum, as EC2 does for Linux.

    Parameters
    ----------
    clock
        Returns the current time in seconds; ``time.time`` by default.
    minimum_seconds
        Billing minimum per instance.

    Examples
    --------
    >>> meter = CostMeter(clock=lambda: 1000.0)
    >>> meter.launched("i-1", "m6i.large", "on-demand", 0.096, at=0.0)
    >>> round(meter.spent(), 4), meter.cost_per_hour()
    (0.0267, 0.096)
    """

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        minimum_seconds: float = BILLING_MINIMUM_SECONDS,
    ) -> None:
        self.clock = clock
        self.minimum_seconds = minimum_seconds
        self._usage: dict[str, Usage] = {}
        self._lock = threading.Lock()  # providers may report from another thread

    def launched(
        self,
        instance_id: str,
        vm_type: str | PricedType,
        market: str,
        hourly_price: float | None = None,
        at: float | None = None,
        parts: Mapping[str, float] | None = None,
    ) -> None:
        """Record a launch; the price defaults to an annotated ``vm_type``'s price on ``market``.

        ``parts`` is what the machine costs per hour by what is billed (the instance, its
        storage, its public address); their sum is the price when ``hourly_price`` is None.
        A second report of the same instance is ignored: launches may be reported twice.
        """
        check_market(market)
        if hourly_price is None and parts:
            hourly_price = sum(parts.values())
        if hourly_price is None:
            hourly_price = None if isinstance(vm_type, str) else vm_type.price(market)
        if hourly_price is None:
            raise ValueError(f"no hourly price for {instance_id}: pass hourly_price=...")
        name = vm_type if isinstance(vm_type, str) else vm_type.name
        with self._lock:
            if instance_id not in self._usage:
                self._usage[instance_id] = Usage(
                    instance_id,
                    name,
                    market,
                    float(hourly_price),
                    self._now(at),
                    parts=tuple((k, float(v)) for k, v in (parts or {}).items()),
                )

    def terminated(self, instance_id: str, at: float | None = None) -> None:
        """Record a termination; the first one counts, unknown ids are ignored.

        (A cluster cleaning up may terminate instances launched before this meter.)
        """
        with self._lock:
            usage = self._usage.get(instance_id)
            if usage is not None and usage.terminated_at is None:
                end = max(self._now(at), usage.launched_at)
                self._usage[instance_id] = dataclasses.replace(usage, terminated_at=end)

    def spent(self, now: float | None = None) -> float:
        """USD spent so far by every instance recorded, running or not."""
        moment = self._now(now)
        with self._lock:
            return sum(u.cost(moment, self.minimum_seconds) for u in self._usage.values())

    def cost_per_hour(self) -> float:
        """USD per hour of the instances running now."""
        with self._lock:
            return sum(u.hourly_price for u in self._usage.values() if u.terminated_at is None)

    def cost_per_hour_by_part(self) -> dict[str, float]:
        """USD per hour of what runs now, by what is billed (``instance``, ``storage``,
        ``public_ipv4``); launches recorded without parts count as ``instance``."""
        totals: dict[str, float] = {}
        with self._lock:
            for usage in self._usage.values():
                if usage.terminated_at is not None:
                    continue
                for part, price in usage.parts or (("instance", usage.hourly_price),):
                    totals[part] = totals.get(part, 0.0) + price
        return totals

    def running(self) -> list[str]:
        """Ids of the instances not yet terminated."""
        with self._lock:
            return [i for i, u in self._usage.items() if u.terminated_at is None]

    def usage(self) -> list[Usage]:
        """Every instance recorded, in launch order."""
        with self._lock:
            return list(self._usage.values())

    def summary(self, now: float | None = None) -> str:
        """``$1.23 spent; $0.40/h now (5 instances running)``."""
        count = len(self.running())
        return (
            f"{format_money(self.spent(now))} spent; {format_money(self.cost_per_hour())}/h now "
            f"({count} instance{'s' if count != 1 else ''} running)"
        )

    def _now(self, at: float | None) -> float:
        return self.clock() if at is None else at


# -- the budget guard ----------------------------------------------------------------------


def check_budget(
    current_per_hour: float,
    additional_estimate: float | CostEstimate,
    max_hourly_cost: float | None,
) -> None:
    """Refuse a launch or scale-up that would take the cluster over ``max_hourly_cost``.

    Parameters
    ----------
    current_per_hour
        USD/hour running now (:meth:`CostMeter.cost_per_hour`).
    additional_estimate
        What the launch adds: USD/hour, or a :class:`CostEstimate` (named in the message).
    max_hourly_cost
        The limit in USD/hour; None for no limit.

    Raises
    ------
    BudgetExceeded
        Naming what runs now, what was asked for, the limit, and the ways out.
    """
    if max_hourly_cost is None:
        return
    added = (
        additional_estimate.per_hour
        if isinstance(additional_estimate, CostEstimate)
        else float(additional_estimate)
    )
    total = current_per_hour + added
    if total <= max_hourly_cost + _EPSILON:
        return
    what = (
        f"{additional_estimate} more"
        if isinstance(additional_estimate, CostEstimate)
        else f"{format_money(added)}/h more"
    )
    raise BudgetExceeded(
        f"refusing to launch {what}: the cluster would cost {format_money(total)}/h "
        f"(running now {format_money(current_per_hour)}/h + requested {format_money(added)}/h), "
        f"over max_hourly_cost={format_money(max_hourly_cost)}/h. Fix: raise max_hourly_cost, "
        "ask for fewer workers (or a lower adapt maximum), use spot instances, or choose a "
        "smaller or cheaper worker type",
        current=current_per_hour,
        requested=added,
        limit=max_hourly_cost,
    )


def affordable_count(
    current_per_hour: float, unit_price: float, max_hourly_cost: float | None
) -> int | None:
    """How many more instances at ``unit_price`` fit under the limit; None when unlimited.

    For a scale-up that should launch what the budget allows rather than nothing.
    """
    if max_hourly_cost is None or unit_price <= 0:
        return None
    room = max_hourly_cost - current_per_hour + _EPSILON
    return max(0, math.floor(room / unit_price))
