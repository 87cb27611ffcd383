"""Dense mode: a thousand worker VMs on one machine, as in-process Dask workers.

A local VM is a process group that installs an environment and runs ``dask worker``: tens
of them fit on a laptop, not a thousand. To measure the cluster manager at that size (its
launches, the name map, adapt, retirement and termination, the scheduler's view) the worker
VMs of a dense cloud (``LocalCloud(dense=True)``) run as ``distributed.Worker`` objects
spread over a few host processes (:mod:`.densehost`), each listening on its VM's own
loopback address. Everything around them stays what it is: the instances are moto's, launched
and terminated through the EC2 API; a VM learns its name from the cluster's name map in S3
by its expiring URL and its TLS material the same way; terminating an instance closes its
worker; a worker that ends (retired, scheduler gone) powers its VM off, which terminates the
instance. The scheduler VM (and any VM whose boot script is not a worker's) boots as usual,
as a process of its own.

A boot script is a worker's when its variable block (the quoted assignments at its top,
:mod:`dask_rawvm.environment.bootstrap`) names a scheduler (``RAWVM_SCHEDULER``); the host
reads the variables instead of running the script. What differs from a worker VM: no
environment install (the host runs this machine's Python, as the warm image does), no
Nanny, and per-worker timers nothing of the control path reads run less often
(:data:`.densehost.DENSE_CONFIG`).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from dask_rawvm.localcloud.lifetime import Watchdog

logger = logging.getLogger(__name__)

#: The variable of a worker's boot script that names its scheduler.
WORKER_VARIABLE = "RAWVM_SCHEDULER"
_ASSIGNMENT = re.compile(r"[A-Z_][A-Z0-9_]*=")


def script_variables(script: str) -> dict[str, str]:
    """The variable block of a boot script: its leading ``NAME=value`` lines (shell-quoted),
    after the shebang and comments; empty when it has none."""
    variables: dict[str, str] = {}
    for line in script.splitlines():
        if not line or line.startswith("#") or line == "set -u":
            if variables:
                break
            continue
        if not _ASSIGNMENT.match(line):
            break
        words = shlex.split(line)
        if len(words) != 1:
            break
        name, _, value = words[0].partition("=")
        variables[name] = value
    return variables


class _Host:
    """One host process and what it runs."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        self.process = process
        self.vms: set[str] = set()
        self.lock = threading.Lock()

    def send(self, command: dict[str, Any]) -> None:
        stdin: IO[bytes] | None = self.process.stdin
        if stdin is None:
            return
        with self.lock:
            try:
                stdin.write(json.dumps(command).encode() + b"\n")
                stdin.flush()
            except (BrokenPipeError, ValueError):  # the host is gone (closing)
                pass


class DenseHosts:
    """The host processes of a dense cloud, and which worker VM runs in which.

    Parameters
    ----------
    count
        Host processes (by default this machine's CPU count: each runs one event loop).
    directory
        Where each host's log goes (``dense-host-<i>.log``).
    watchdog
        The cloud's watchdog: told of each host's process group, so that hosts end with
        the process that owns the cloud.
    on_exit
        Called with an instance id and an exit code when a VM's worker ended by itself.
    """

    def __init__(
        self,
        count: int,
        directory: Path,
        watchdog: Watchdog,
        on_exit: Callable[[str, int], None],
    ) -> None:
        self.on_exit = on_exit
        self.hosts: list[_Host] = []
        self._where: dict[str, _Host] = {}
        self._lock = threading.Lock()
        self._order = itertools.count()
        directory.mkdir(parents=True, exist_ok=True)
        for index in range(count):
            with open(directory / f"dense-host-{index}.log", "ab") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "dask_rawvm.localcloud.densehost"],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log,
                    start_new_session=True,
                    env={**os.environ, "PYTHONUNBUFFERED": "1"},
                )
            watchdog.watch_group(process.pid)
            host = _Host(process)
            self.hosts.append(host)
            threading.Thread(
                target=self._events, args=(host,), name=f"dense-host-{index}", daemon=True
            ).start()

    def boot(self, instance_id: str, command: dict[str, Any]) -> None:
        """Boot a worker VM in the host running the fewest."""
        with self._lock:
            host = min(self.hosts, key=lambda h: (len(h.vms), next(self._order)))
            host.vms.add(instance_id)
            self._where[instance_id] = host
        host.send({"op": "boot", "id": instance_id, **command})

    def halt(self, instance_id: str) -> None:
        """Close the worker of a halted VM."""
        with self._lock:
            host = self._where.pop(instance_id, None)
            if host is not None:
                host.vms.discard(instance_id)
        if host is not None:
            host.send({"op": "halt", "id": instance_id})

    def close(self, timeout: float = 20.0) -> None:
        """End every host: their workers close, then they exit (killed past ``timeout``)."""
        for host in self.hosts:
            with host.lock:
                if host.process.stdin is not None:
                    host.process.stdin.close()
        for host in self.hosts:
            try:
                host.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                host.process.kill()
                host.process.wait()

    def _events(self, host: _Host) -> None:
        stdout = host.process.stdout
        assert stdout is not None
        for line in stdout:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") != "exited":
                continue
            with self._lock:
                self._where.pop(event["id"], None)
                host.vms.discard(event["id"])
            try:
                self.on_exit(event["id"], int(event.get("code", 0)))
            except Exception:
                logger.exception("local cloud: a dense VM's power-off failed")
