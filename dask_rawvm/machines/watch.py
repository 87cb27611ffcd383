"""Watching machines boot: their state, their boot logs, and errors that carry both."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable

from dask_rawvm.errors import ProviderError
from dask_rawvm.machines.ledger import Ledger
from dask_rawvm.machines.names import worker_index
from dask_rawvm.machines.session import ProviderSession
from dask_rawvm.providers.base import Machine

logger = logging.getLogger(__name__)

#: Lines of a boot log an error message quotes.
LOG_TAIL_LINES = 15
#: VMs a "still waiting for" message describes one by one (the rest: counts by state).
DESCRIBED_VMS = 10


class BootWatch:
    """What booting machines are doing, from the provider, recorded in the ledger.

    Parameters
    ----------
    session
        The cluster's provider.
    ledger
        Where each machine's latest state is recorded.
    """

    def __init__(self, session: ProviderSession, ledger: Ledger) -> None:
        self.session = session
        self.ledger = ledger
        self._logs_unavailable: str | None = None  # why boot logs cannot be read, once known

    async def describe(self, machine_id: str) -> Machine:
        """One machine's current state."""
        (machine,) = await self.session.provider.describe([machine_id])
        self.ledger.described(machine)
        return machine

    async def console_output(self, machine_id: str) -> str:
        """What the machine's boot printed so far; empty where the cloud will not say.

        Boot logs are optional: a cloud that refuses them (EC2 without
        ``ec2:GetConsoleOutput``) never stops a cluster; it is said once, in the log.
        """
        try:
            return await self.session.provider.console_output(machine_id)
        except ProviderError as e:
            if self._logs_unavailable is None:
                self._logs_unavailable = str(e)
                logger.warning("boot logs unavailable, going on without them: %s", e)
            return ""

    async def raise_if_dead(self, machines: list[Machine]) -> list[Machine]:
        """Describe booting VMs; raise, with its boot log, if one has gone."""
        if not machines:
            return []
        described = await self.session.provider.describe([m.id for m in machines])
        for machine in described:
            if machine.state not in ("pending", "running"):
                raise ProviderError(await self.boot_failure(machine, "a worker VM died at boot"))
        return described

    async def describe_waiting(
        self, machines: dict[str, Machine | None], waiting: Iterable[str] = ()
    ) -> str:
        """What each VM we are waiting for is doing (state, last log line), and which
        workers (``waiting``) have no capacity yet.

        The first :data:`DESCRIBED_VMS` VMs get a line each (one log fetch apiece), the
        rest a count by state: an error about 500 late VMs stays readable and quick.
        """
        lines = []
        known = {m.id: name for name, m in machines.items() if m is not None}
        described = await self.session.provider.describe(list(known)) if known else []
        described.sort(key=lambda m: worker_index(known[m.id]))
        for machine in described[:DESCRIBED_VMS]:
            try:
                log = (await self.console_output(machine.id)).strip().splitlines()
            except ProviderError:
                log = []
            last = log[-1] if log else "(nothing logged yet)"
            lines.append(f"{known[machine.id]} ({machine.id}, {machine.state}): {last}")
        rest = Counter(m.state for m in described[DESCRIBED_VMS:])
        if rest:
            states = ", ".join(f"{n} {state}" for state, n in sorted(rest.items()))
            lines.append(f"{sum(rest.values())} more ({states})")
        no_capacity = sorted(waiting, key=worker_index)
        unlaunched = [n for n, m in machines.items() if m is None and n not in no_capacity]
        if no_capacity:
            lines.append(f"no capacity yet for {no_capacity}")
        if unlaunched:
            lines.append(f"not launched yet: {sorted(unlaunched, key=worker_index)}")
        return "still waiting for: " + "; ".join(lines) if lines else "no VM is booting"

    async def boot_failure(self, machine: Machine, what: str) -> str:
        """A message saying what a VM was doing, with the tail of its boot log."""
        log = await self.console_output(machine.id)
        unavailable = f"(no boot log: {self._logs_unavailable})" if self._logs_unavailable else ""
        tail = (
            "\n".join(log.strip().splitlines()[-LOG_TAIL_LINES:]) or unavailable or "(no boot log)"
        )
        reason = f" ({machine.state_reason})" if machine.state_reason else ""
        return (
            f"{what}: instance {machine.id} is {machine.state}{reason}. "
            f"Last lines of its boot log:\n{tail}"
        )
