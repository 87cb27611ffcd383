"""The scheduler preload that shuts an idle cluster down; it runs on the scheduler's VM.

``dask scheduler --preload dask_rawvm.idle_shutdown`` (the bootstrap's) installs
:class:`IdleShutdown`:
distributed's own ``--idle-timeout`` only looks at tasks, so it would shut a
cluster down under a notebook that is connected but thinking. Here a cluster is
idle only when no client is connected and no task has run.

Imported on the VM: it imports distributed and nothing else of dask_rawvm's (no
cloud, no local cloud, no cluster), which a test holds.
"""

from __future__ import annotations

import logging
import os
import time

from distributed.diagnostics.plugin import SchedulerPlugin
from distributed.scheduler import Scheduler
from tornado.ioloop import PeriodicCallback

logger = logging.getLogger(__name__)

#: Scheduler-internal client entries that are not a user.
_INTERNAL_CLIENTS = {"fire-and-forget"}


class IdleShutdown(SchedulerPlugin):
    """Close the scheduler after ``timeout`` seconds with no client and no task.

    The scheduler VM's bootstrap powers the VM off when the scheduler exits, and
    workers follow after their death timeout: nothing outlives an abandoned cluster.
    """

    name = "dask-rawvm-idle-shutdown"

    def __init__(self, timeout: float, interval: float | None = None) -> None:
        self.timeout = timeout
        self.interval = interval or max(0.5, min(timeout / 4, 10.0))
        self.idle_since = time.monotonic()
        self._transitions = -1
        self.checks = 0
        self._callback: PeriodicCallback | None = None

    async def start(self, scheduler: Scheduler) -> None:
        self.scheduler = scheduler
        self._callback = PeriodicCallback(self.check, self.interval * 1000)
        self._callback.start()

    async def close(self) -> None:
        if self._callback is not None:
            self._callback.stop()

    def busy(self) -> bool:
        """A user is connected, or tasks are moving."""
        s = self.scheduler
        transitions, self._transitions = self._transitions, s.transition_counter
        return bool(
            set(s.clients) - _INTERNAL_CLIENTS
            or transitions != s.transition_counter
            or s.queued
            or s.unrunnable
            or any(ws.processing for ws in s.workers.values())
        )

    def check(self) -> None:
        self.checks += 1
        if self.busy():
            self.idle_since = time.monotonic()
        elif time.monotonic() - self.idle_since > self.timeout:
            logger.info("no client and no task for %.0f s: shutting the cluster down", self.timeout)
            self._callback.stop()  # type: ignore[union-attr]
            self.scheduler._ongoing_background_tasks.call_soon(self.scheduler.close)


def dask_setup(scheduler: Scheduler) -> None:
    """Preload hook: read the timeout the bootstrap exported, install the plugin."""
    timeout = os.environ.get("RAWVM_IDLE_TIMEOUT")
    if timeout:
        scheduler.add_plugin(IdleShutdown(float(timeout)))
