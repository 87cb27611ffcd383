"""The record of a cluster's machines: which exist, which worker each one is, what they cost."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType

from dask_rawvm.cost import CostMeter
from dask_rawvm.providers.base import Machine


class Ledger:
    """Every machine a cluster launched or adopted, its worker, and the cost meter.

    No calls: the launcher and the boot watch write to it, the cluster reads it.

    Parameters
    ----------
    meter
        Counts the cost of what is recorded as launched; a new one by default.
    """

    def __init__(self, meter: CostMeter | None = None) -> None:
        self.meter = meter or CostMeter()
        self._machines: dict[str, Machine] = {}  # every machine known, by id, as last seen
        self._terminated: set[str] = set()
        self._assigned: dict[str, Machine] = {}  # each worker's machine, by worker name

    # -- writing ------------------------------------------------------------------------
    def launched(
        self, machines: Iterable[Machine], costs: Callable[[Machine], Mapping[str, float]]
    ) -> None:
        """Machines launched for the cluster; the meter counts each at what ``costs(machine)``
        says it costs per hour, by part (instance, storage, public address)."""
        for machine in machines:
            self._machines[machine.id] = machine
            self.meter.launched(machine.id, machine.vm_type, machine.market, parts=costs(machine))

    def adopted(self, machines: Iterable[Machine]) -> None:
        """Machines of the running cluster a client reconnected to (launched by another)."""
        self._machines.update((m.id, m) for m in machines)

    def described(self, machine: Machine) -> None:
        """The latest state of a machine."""
        self._machines[machine.id] = machine

    def assign(self, name: str, machine: Machine) -> None:
        """``machine`` is the worker ``name``'s."""
        self._assigned[name] = machine

    def terminated(self, ids: Iterable[str]) -> None:
        """Machines gone (the first report counts)."""
        for machine_id in set(ids) - self._terminated:
            self._terminated.add(machine_id)
            self.meter.terminated(machine_id)

    def all_terminated(self) -> None:
        """Every machine known is gone (the cluster's cleanup by tag succeeded)."""
        self.terminated(list(self._machines))

    # -- reading ------------------------------------------------------------------------
    @property
    def assigned(self) -> Mapping[str, Machine]:
        """Each worker's machine, by worker name (read-only)."""
        return MappingProxyType(self._assigned)

    def machine_of(self, name: str) -> Machine | None:
        """The worker ``name``'s machine; None before launch or while no capacity was found."""
        return self._assigned.get(name)

    def live(self) -> list[Machine]:
        """The machines known and not yet terminated, as last described."""
        return [m for i, m in self._machines.items() if i not in self._terminated]

    def cost_per_hour(self) -> float:
        """Estimated USD per hour of the machines running now."""
        return self.meter.cost_per_hour()

    def spent(self) -> float:
        """Estimated USD spent so far."""
        return self.meter.spent()
