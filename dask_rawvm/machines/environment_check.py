"""The fidelity check at start: a VM's distributions against this process's, after translation.

Once the scheduler VM answers, and once a worker connects, their distributions are read
(``client.run``) and compared with this process's (:mod:`dask_rawvm.environment.fidelity`):
a package this process has imported that a VM lacks or has at another version is an error
naming each (``environment_check="error"``), or a warning (``"warn"``); other differences
are one warning. distributed's own check compares six packages and only warns.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from importlib import metadata

from distributed import Client

from dask_rawvm.environment.fidelity import (
    FidelityReport,
    compare,
    imported_distributions,
    installed_versions,
)
from dask_rawvm.environment.inventory import client_side_here
from dask_rawvm.environment.translate import Expected
from dask_rawvm.errors import RawVMError

logger = logging.getLogger(__name__)


class EnvironmentMismatch(RawVMError):
    """A VM lacks, or has at another version, packages this process has imported.

    Attributes
    ----------
    report : FidelityReport
        Every difference found.
    """

    def __init__(self, report: FidelityReport) -> None:
        self.report = report
        super().__init__(report.error_message())


class EnvironmentCheck:
    """Compares each role's VMs with this process, once per role.

    Parameters
    ----------
    mode
        ``environment_check``: ``"error"``, ``"warn"`` or ``"off"``.
    expected
        Per role (``"scheduler"``, ``"worker"``): what its VMs should have of each
        distribution here (``Bundle.expected``). A role without is not checked.
    """

    def __init__(self, mode: str, expected: Mapping[str, Mapping[str, Expected]]) -> None:
        self.mode = mode
        self.expected = expected
        self.reports: dict[str, FidelityReport] = {}  # by role, once checked

    def wants(self, role: str) -> bool:
        """Whether ``role`` still needs checking."""
        return self.mode != "off" and role in self.expected and role not in self.reports

    async def scheduler(self, client: Client) -> None:
        """Check the scheduler VM (raises :class:`EnvironmentMismatch` in ``"error"`` mode)."""
        if self.wants("scheduler"):
            there = await client.run_on_scheduler(installed_versions)
            self._judge("scheduler", there, "the scheduler VM")

    async def worker(self, client: Client, address: str, name: str) -> None:
        """Check one worker's VM (raises :class:`EnvironmentMismatch` in ``"error"`` mode)."""
        if self.wants("worker"):
            there = (await client.run(installed_versions, workers=[address]))[address]
            self._judge("worker", there, f"worker {name}")

    @functools.cached_property
    def _here(self) -> tuple[dict[str, str], Mapping[str, list[str]]]:
        """This process's distributions and which provide each module: read once for
        every role (0.35 s of CPU on the cluster's event loop, measured); what it has
        imported is read at each check."""
        return installed_versions(), metadata.packages_distributions()

    def _judge(self, role: str, there: Mapping[str, str], where: str) -> None:
        here, providers = self._here
        report = compare(
            here,
            there,
            self.expected[role],
            where,
            imported_distributions(providers=providers),
            exempt=client_side_here(),
        )
        self.reports[role] = report
        if report.warnings:
            logger.warning("%s", report.warning_message())
        if report.errors:
            if self.mode == "error":
                raise EnvironmentMismatch(report)
            logger.warning("%s", report.error_message())
        elif not report.warnings:
            logger.info("%s has this environment (%d distributions compared)", where, len(there))
