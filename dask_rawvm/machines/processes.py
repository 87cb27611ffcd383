"""The scheduler VM and worker VMs as ``ProcessInterface`` objects: thin, over the launcher.

``start()`` returns once the provider accepted the request (the scheduler's also waits
until its Dask scheduler answers: the cluster cannot go on without it); ``close()`` asks
for termination. Both go through the cluster's
:class:`~dask_rawvm.machines.launcher.Launcher`, which batches a pass's requests.
"""

from __future__ import annotations

import asyncio
import time

from distributed.core import Status, rpc
from distributed.deploy.spec import ProcessInterface

from dask_rawvm.environment import bootstrap
from dask_rawvm.errors import ProviderError
from dask_rawvm.machines.launcher import Launcher
from dask_rawvm.machines.ledger import Ledger
from dask_rawvm.machines.settings import Settings
from dask_rawvm.machines.shape import WorkerShape
from dask_rawvm.machines.store import ClusterStore
from dask_rawvm.machines.watch import BootWatch
from dask_rawvm.progress import Reporter
from dask_rawvm.providers.base import Machine


class SchedulerVM(ProcessInterface):
    """The Dask scheduler on a VM of its own.

    ``address`` is where the client reaches it (the public address);
    ``contact_address`` is where workers reach it (the private address).

    Parameters
    ----------
    settings, launcher, watch, store, report
        The cluster's options, launcher, boot watch, store (the client's TLS
        certificate) and progress reporter.
    machine
        The scheduler VM of a running cluster this client reconnects to; None to launch one.
    """

    def __init__(
        self,
        settings: Settings,
        launcher: Launcher,
        watch: BootWatch,
        store: ClusterStore,
        report: Reporter,
        machine: Machine | None = None,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.launcher = launcher
        self.watch = watch
        self.store = store
        self.report = report
        self.machine = machine
        self.contact_address: str | None = None

    async def start(self) -> None:
        if self.machine is None:
            self.report.update(stage="launching the scheduler VM")
            self.machine = await self.launcher.launch_scheduler()
        self.report.update(
            stage=f"scheduler VM {self.machine.id} ({self.machine.vm_type}) is booting"
        )
        deadline = time.monotonic() + self.settings.options.scheduler_timeout
        machine = await self._wait_running(deadline)
        port, scheme = bootstrap.SCHEDULER_PORT, self.settings.scheme
        self.address = f"{scheme}://{machine.address}:{port}"
        self.contact_address = f"{scheme}://{machine.private_ip or machine.address}:{port}"
        await self._wait_answering(deadline)
        await super().start()

    async def _wait_running(self, deadline: float) -> Machine:
        assert self.machine is not None
        while True:
            machine = await self.watch.describe(self.machine.id)
            if machine.state == "running" and machine.address:
                return machine
            await self._check(machine, deadline, "the scheduler VM did not reach running")
            await asyncio.sleep(1)

    async def _wait_answering(self, deadline: float) -> None:
        assert self.machine is not None and self.address is not None
        security = self.store.client_security
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
                machine = await self.watch.describe(self.machine.id)
                await self._check(machine, deadline, "the scheduler did not start")
                log = (await self.watch.console_output(machine.id)).strip().splitlines()
                self.report.update(stage=f"scheduler VM: {log[-1][:100] if log else 'booting'}")
            elif time.monotonic() > deadline:
                machine = await self.watch.describe(self.machine.id)
                await self._check(machine, deadline, "the scheduler did not start")
            await asyncio.sleep(0.5)

    async def _check(self, machine: Machine, deadline: float, what: str) -> None:
        if machine.state not in ("pending", "running"):
            raise ProviderError(await self.watch.boot_failure(machine, what))
        if time.monotonic() > deadline:
            timeout = self.settings.options.scheduler_timeout
            if machine.private_ip and not machine.public_ip and machine.state == "running":
                # public_ip=False: only a client with a route into the VPC reaches it.
                what += (
                    f" (the scheduler VM has no public address: this client must reach its "
                    f"private address {machine.private_ip} on port {bootstrap.SCHEDULER_PORT}, "
                    "from inside the VPC or over a VPN or peering whose ranges "
                    "allow_ingress_from names)"
                )
            raise TimeoutError(
                await self.watch.boot_failure(machine, f"{what} within {timeout:.0f} s")
            )

    async def close(self) -> None:
        if self.machine is not None:
            await self.launcher.terminate(self.machine.id)
        await super().close()


class WorkerVM(ProcessInterface):
    """One Dask worker on one VM, named before it boots.

    Parameters
    ----------
    scheduler, name
        Where the worker connects, and its name (its spec key).
    launcher, ledger
        The cluster's launcher and ledger.
    nthreads, memory_limit
        What the worker spec says the worker is (SpecCluster scales by them); the
        VM's worker starts with exactly these. None: the options' (or the worker's own).
    """

    def __init__(
        self,
        scheduler: str,
        name: str,
        launcher: Launcher,
        ledger: Ledger,
        nthreads: int | None = None,
        memory_limit: int | None = None,
    ) -> None:
        super().__init__(scheduler=scheduler, name=name)
        # ProcessInterface takes these but does not keep them.
        self.scheduler = scheduler
        self.name = name
        self.launcher = launcher
        self.ledger = ledger
        self.shape = WorkerShape.from_spec({"nthreads": nthreads, "memory_limit": memory_limit})

    @property
    def machine(self) -> Machine | None:
        """This worker's VM: None before launch, or while the cloud is short of capacity."""
        return self.ledger.machine_of(self.name)

    @classmethod
    def adopt(
        cls, scheduler: str, name: str, launcher: Launcher, ledger: Ledger, machine: Machine
    ) -> WorkerVM:
        """A worker of a running cluster this client reconnected to."""
        worker = cls(scheduler, name, launcher, ledger)
        ledger.assign(name, machine)
        worker.status = Status.running
        return worker

    async def start(self) -> None:
        # Started once the cloud took the request, with or without capacity for it yet:
        # a VM asked for in the background joins when it lands.
        await self.launcher.launch_worker(self.name, self.scheduler, self.shape)
        await super().start()

    async def close(self) -> None:
        machine = self.machine
        if machine is not None:
            await self.launcher.terminate(machine.id)
        else:
            self.launcher.cancel(self.name)
        await super().close()

    def __repr__(self) -> str:
        where = self.machine.id if self.machine else "not launched"
        return f"<WorkerVM {self.name} {where} {self.status.name}>"
