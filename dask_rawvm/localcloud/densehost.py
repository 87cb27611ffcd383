"""A dense host: many worker VMs of the local cloud as Dask workers in one process.

Run by the cloud (:mod:`.dense`) as ``python -m dask_rawvm.localcloud.densehost``. It reads
one JSON command per line on stdin and writes one JSON event per line on stdout:

``{"op": "boot", "id": ..., "ip": ..., "variables": {...}, "console": ..., "home": ...,
"vcpus": N, "memory": bytes}``
    Boot a worker VM: do what its boot script would (the script's variables say what),
    minus the environment (this process's is the warm image's): find the worker's name in
    the cluster's name map (``RAWVM_NAMES_URL``, polled as the script polls it) or from its
    launch index, fetch the TLS material (``RAWVM_SECRETS_URL``) and the client's dask config
    (``RAWVM_CONFIG_URL``) by their expiring URLs, and start a ``distributed.Worker`` listening
    on the VM's own address, with the instance type's vCPUs and memory unless the script sets
    threads and a memory limit. Its boot log lines go to the VM's console file.
``{"op": "halt", "id": ...}``
    The instance was stopped or terminated: close its worker (a VM's shutdown sends its
    Dask process SIGTERM, which closes it the same way).

Events: ``{"event": "exited", "id": ..., "code": N}`` once a VM's worker ended by itself
(retired, or its scheduler gone past the death timeout): the VM powered itself off. At
end of stdin (the cloud closed, or its process died) every worker is closed and the host
exits.

What is not the real thing: no environment install, no Nanny (a real VM's ``dask worker``
runs one), and per-worker housekeeping the control path does not depend on runs less often
(:data:`DENSE_CONFIG`), so that a thousand workers fit in a few processes.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import os
import resource
import sys
import time
import urllib.request
from typing import Any

import dask.config
from distributed import Worker
from distributed.security import Security

from dask_rawvm.tls import security_from_material, unpack_vm_material

logger = logging.getLogger("dask_rawvm.localcloud.densehost")

#: Per-worker timers that cost CPU in proportion to the number of workers and that nothing of
#: the control path reads: the event-loop tick (20 ms each by default), the system monitor
#: (500 ms), the memory monitor (100 ms) and the statistical profiler (10 ms). At their
#: defaults 500 workers of one process run ~80,000 callbacks a second and starve the rest.
#: Heartbeats, connection handling and timeouts stay distributed's own.
DENSE_CONFIG = {
    "distributed.admin.tick.interval": "2s",
    "distributed.admin.tick.limit": "1h",
    "distributed.admin.system-monitor.interval": "30s",
    "distributed.worker.memory.monitor-interval": "10s",
    "distributed.worker.profile.enabled": False,
    "distributed.diagnostics.nvml": False,
}
#: Concurrent fetches (names, TLS material, config) of one host from the cloud's S3.
FETCH_THREADS = 8
#: Seconds a closing worker gets (halted VMs; the end of the host).
CLOSE_TIMEOUT = 10


def _opener() -> urllib.request.OpenerDirector:
    # The cloud's S3 is on loopback: never through a proxy a benchmark may have set.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}))


class DenseHost:
    """The worker VMs of one host process, by instance id."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.workers: dict[str, Worker] = {}
        self._pool = concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, "densehost-fetch")
        self._opener = _opener()
        self._inflight: dict[str, asyncio.Future[bytes]] = {}
        self._kept: dict[str, Any] = {}  # secrets and config, by URL (fetched once)
        self._config_url: str | None = None

    # -- commands ---------------------------------------------------------------------------
    def boot(self, command: dict[str, Any]) -> None:
        vm_id = command["id"]
        self.tasks[vm_id] = asyncio.ensure_future(self._run(command))

    async def halt(self, vm_id: str) -> None:
        worker = self.workers.get(vm_id)
        if worker is not None:
            with contextlib.suppress(Exception):
                await worker.close(
                    timeout=CLOSE_TIMEOUT, executor_wait=False, reason="instance halted"
                )
        else:
            task = self.tasks.get(vm_id)
            if task is not None:
                task.cancel()

    async def close(self) -> None:
        await asyncio.gather(*(self.halt(vm_id) for vm_id in list(self.tasks)))

    # -- one VM -------------------------------------------------------------------------------
    async def _run(self, command: dict[str, Any]) -> None:
        vm_id = command["id"]
        variables: dict[str, str] = command["variables"]
        console = command["console"]
        code = 1
        try:
            self._log(console, f"dense VM {vm_id} ({command['ip']}) booting")
            await self._apply_config(variables.get("RAWVM_CONFIG_URL", ""))
            name = await self._name(vm_id, variables, int(command.get("launch_index", 0)))
            security = await self._security(variables.get("RAWVM_SECRETS_URL", ""))
            cluster = variables.get("RAWVM_CLUSTER", "")
            self._log(console, f"worker {name} of cluster {cluster} on {vm_id} ({command['ip']})")
            nthreads = variables.get("RAWVM_NTHREADS") or command.get("vcpus") or 1
            memory = variables.get("RAWVM_MEMORY_LIMIT") or "auto"
            worker = Worker(
                variables["RAWVM_SCHEDULER"],
                name=name,
                host=command["ip"],
                nthreads=int(nthreads),
                memory_limit=(command.get("memory") or 0) if memory == "auto" else memory,
                death_timeout=float(variables.get("RAWVM_DEATH_TIMEOUT") or 60),
                security=security,
                protocol="tls" if security is not None else "tcp",
                local_directory=command["home"],
                nanny=None,
            )
            self.workers[vm_id] = worker
            await worker
            await worker.finished()
            code = 0
        except asyncio.CancelledError:
            return  # halted before its worker started: nothing to report
        except Exception as e:
            self._log(console, f"dense VM failed: {type(e).__name__}: {e}")
        finally:
            self.workers.pop(vm_id, None)
            self.tasks.pop(vm_id, None)
        self._log(console, f"worker exited with code {code}")
        _emit({"event": "exited", "id": vm_id, "code": code})

    async def _name(self, vm_id: str, variables: dict[str, str], launch_index: int) -> str:
        """As the boot script finds it: the map written after launch, else the launch index."""
        url = variables.get("RAWVM_NAMES_URL", "")
        if not url:
            first = int(variables.get("RAWVM_FIRST_INDEX") or 0)
            return f"{variables.get('RAWVM_NAME_PREFIX', 'worker-')}{first + launch_index}"
        deadline = time.monotonic() + float(variables.get("RAWVM_NAME_WAIT") or 300)
        while True:
            with contextlib.suppress(OSError):
                for line in (await self._fetch(url)).decode().splitlines():
                    machine, _, name = line.partition(" ")
                    if machine == vm_id and name:
                        return name.strip()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the cluster named no worker {vm_id}")
            await asyncio.sleep(1)

    async def _security(self, url: str) -> Security | None:
        if not url:
            return None
        if url not in self._kept:
            self._kept[url] = security_from_material(unpack_vm_material(await self._fetch(url)))
        security: Security = self._kept[url]
        return security

    async def _apply_config(self, url: str) -> None:
        """The client's dask config (read by dask at import on a VM), then the dense timers."""
        if not url or url == self._config_url:
            return
        text = (await self._fetch(url)).decode()
        self._config_url = url
        dask.config.update(dask.config.config, dask.config.deserialize(text), priority="new")
        dask.config.set(DENSE_CONFIG)

    async def _fetch(self, url: str) -> bytes:
        """GET ``url``; VMs asking for the same URL at once share one request."""
        future = self._inflight.get(url)
        if future is None:
            loop = asyncio.get_running_loop()
            future = asyncio.ensure_future(loop.run_in_executor(self._pool, self._get, url))
            self._inflight[url] = future
            future.add_done_callback(lambda _: self._inflight.pop(url, None))
        return await asyncio.shield(future)

    def _get(self, url: str) -> bytes:
        with self._opener.open(url, timeout=30) as response:
            return bytes(response.read())

    @staticmethod
    def _log(console: str, line: str) -> None:
        stamp = time.strftime("%H:%M:%S", time.gmtime())
        with contextlib.suppress(OSError), open(console, "a") as f:
            f.write(f"[dask-rawvm {stamp}] {line}\n")


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


async def _serve() -> None:
    host = DenseHost()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    halts: set[asyncio.Task[None]] = set()
    while line := await reader.readline():
        command = json.loads(line)
        if command["op"] == "boot":
            host.boot(command)
        elif command["op"] == "halt":
            task = asyncio.ensure_future(host.halt(command["id"]))
            halts.add(task)
            task.add_done_callback(halts.discard)
    await asyncio.wait_for(host.close(), CLOSE_TIMEOUT + 5)


def main() -> None:
    # A host holds a listener and connections for each of its workers.
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    dask.config.set(DENSE_CONFIG)
    with contextlib.suppress(asyncio.TimeoutError, KeyboardInterrupt):
        asyncio.run(_serve())
    os._exit(0)  # workers' executor threads must not hold the exit up


if __name__ == "__main__":
    main()
