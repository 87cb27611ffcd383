"""Machines you already have, over SSH (asyncssh).

A "machine" here is one Dask process slot on a host of the user's list: the
scheduler's on the first host, and up to ``workers_per_host`` worker slots on
every host. Launching a slot runs the same bootstrap script a cloud VM boots
with, as a detached process session on the host (``setsid nohup bash``), with
its identity in ``RAWVM_INSTANCE_ID``/``RAWVM_ADDRESS``/``RAWVM_LAUNCH_INDEX``
and ``RAWVM_POWEROFF=no``: a shared host is never powered off.

Everything the provider creates on a host lives in one directory named after
the cluster, ``~/.cache/dask-rawvm/ssh/<cluster>/`` (each slot's script, log
and metadata), and every process it starts carries the cluster's name in its
environment (``RAWVM_SSH_CLUSTER``), which its children inherit. Finding,
describing and stopping a cluster's processes goes by that marker in
``/proc/<pid>/environ``, never by process name or by a pid that may have been
reused: closing a cluster stops exactly the processes it started, however they
forked, and nothing else. Environment bundles are a content-addressed cache
shared by clusters (``~/.cache/dask-rawvm/bundles/``), like the venvs the
bootstrap builds from them.

Authentication comes from the user's SSH agent, ``~/.ssh/config`` and
``known_hosts`` (asyncssh reads them); ``connect_options`` adds
``asyncssh.connect`` keyword arguments. A host whose key is unknown or changed
is refused, never accepted.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import logging
import os
import re
import shlex
import sys
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import asyncssh

from dask_rawvm.config import ClusterOptions
from dask_rawvm.environment.target import Target
from dask_rawvm.errors import ProviderError
from dask_rawvm.providers.base import (
    CLUSTER_TAG,
    ROLE_TAG,
    LaunchSpec,
    Machine,
    OnGaveUp,
    OnLate,
    Provider,
    WorkerSize,
)

logger = logging.getLogger(__name__)

#: Seconds to reach and authenticate to a host, unless ``connect_options`` sets
#: ``connect_timeout``: an unreachable host must fail a cluster's start fast.
DEFAULT_CONNECT_TIMEOUT = 15.0
#: Seconds any one remote command may take (the longest is a cleanup's stop-and-wait).
COMMAND_TIMEOUT = 120.0
#: Seconds a stopped process gets to exit after SIGTERM before SIGKILL.
STOP_GRACE = 10
#: Bytes of a slot's log that ``console_output`` returns (its end).
LOG_TAIL_BYTES = 1 << 20
#: Commands the bootstrap needs on every host.
REQUIRED_TOOLS = ("bash", "curl", "setsid", "nohup", "tar", "grep", "sed")
#: Prefix of every line of remote output meant for us: login scripts may print too.
_OUT = "@rawvm"

# POSIX sh run before every remote command. ``rawvm_ps`` lists the live processes
# of cluster "$C" as "pid instance-id": those whose environment has the marker.
# Zombies have an empty environ, so the dead never count. Nothing here matches by
# name or by a remembered pid, so nothing of another cluster or user is touched.
_LIBRARY = r"""
rawvm_ps() {
    for f in $(grep -l -s -z -x -F -e "RAWVM_SSH_CLUSTER=$C" /proc/[0-9]*/environ); do
        p=${f#/proc/}; p=${p%/environ}
        i=$(tr '\0' '\n' < "$f" 2>/dev/null | sed -n 's/^RAWVM_INSTANCE_ID=//p')
        [ -n "$i" ] && echo "$p $i"
    done
    return 0
}
rawvm_pids() {
    rawvm_ps | while read -r p i; do
        if [ $# -eq 0 ]; then echo "$p"; continue; fi
        for w in "$@"; do [ "$i" = "$w" ] && echo "$p"; done
    done
}
rawvm_stop() {
    g=$1; shift
    pids=$(rawvm_pids "$@")
    [ -n "$pids" ] || return 0
    kill -TERM $pids 2>/dev/null
    n=0
    while [ -n "$(rawvm_pids "$@")" ] && [ $n -lt $((g * 10)) ]; do sleep 0.1; n=$((n + 1)); done
    pids=$(rawvm_pids "$@")
    [ -z "$pids" ] || kill -KILL $pids 2>/dev/null
    n=0
    while [ -n "$(rawvm_pids "$@")" ] && [ $n -lt 50 ]; do sleep 0.1; n=$((n + 1)); done
    [ -z "$(rawvm_pids "$@")" ]
}
"""

# What the bootstrap needs to know about a host, in one round trip.
_PROBE = r"""
echo "@rawvm home=$HOME"
echo "@rawvm arch=$(uname -m)"
echo "@rawvm glibc=$(getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n 1)"
echo "@rawvm gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU')"
cuda=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
echo "@rawvm cuda=$cuda"
echo "@rawvm python=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)"
echo "@rawvm cpus=$(nproc 2>/dev/null)"
echo "@rawvm memory_kib=$(sed -n 's/^MemTotal: *\([0-9]*\) kB$/\1/p' /proc/meminfo 2>/dev/null)"
for tool in bash curl setsid nohup tar grep sed flock uv python3; do
    command -v "$tool" >/dev/null 2>&1 && echo "@rawvm has=$tool"
done
ls "$HOME/.cache/dask-rawvm/ssh/$CLUSTER_DIR" 2>/dev/null | sed -n 's/\.json$//p' \
    | sed 's/^/@rawvm slot=/'
"""


@dataclass(frozen=True)
class HostSpec:
    """One entry of ``hosts``: ``[user@]host[:port]`` (``[v6]:port`` for IPv6).

    ``host`` may be an alias of ``~/.ssh/config``; user and port left out come
    from there (or asyncssh's defaults).
    """

    text: str
    host: str
    port: int | None = None
    username: str | None = None

    @classmethod
    def parse(cls, text: str) -> HostSpec:
        """Parse ``user@host:port``; raise ValueError for anything else."""
        match = re.fullmatch(r"(?:([^@\s]+)@)?(\[[^\]\s]+\]|[^@:\s\[\]]+)(?::(\d+))?", text.strip())
        if match is None:
            raise ValueError(f"not an SSH host: {text!r}; use 'host', 'user@host' or 'host:port'")
        username, host, port = match.groups()
        return cls(text.strip(), host.strip("[]"), int(port) if port else None, username)

    @property
    def label(self) -> str:
        """The host in machine ids and file names: ``host`` or ``host-port``."""
        raw = self.host if self.port is None else f"{self.host}-{self.port}"
        return re.sub(r"[^A-Za-z0-9.-]", "_", raw)


@dataclass
class _Host:
    """A host of the list, its connection and what its probe found."""

    spec: HostSpec
    label: str
    conn: asyncssh.SSHClientConnection | None = None
    address: str = ""
    info: dict[str, str] = field(default_factory=dict)
    tools: set[str] = field(default_factory=set)
    next_slot: int = 0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def home(self) -> str:
        return self.info["home"]


@dataclass
class _Slot:
    """One process slot the provider started (or found running)."""

    machine: Machine
    host: _Host
    role: str
    gone: bool = False  # terminated by us, or found dead: the slot is free


class SSHProvider(Provider):
    """Dask processes on existing hosts, over SSH.

    Parameters
    ----------
    cluster
        Cluster name: the name of each host's directory for the cluster and the
        marker in the environment of every process it starts.
    options
        The cluster's options: ``hosts``, ``workers_per_host`` and
        ``connect_options`` (extra ``asyncssh.connect`` keyword arguments, such as
        ``username``, ``client_keys``, ``known_hosts``, ``connect_timeout``).
    stop_grace
        Seconds a stopped process gets between SIGTERM and SIGKILL.
    """

    def __init__(self, cluster: str, options: ClusterOptions, stop_grace: int = STOP_GRACE) -> None:
        self.cluster = cluster
        self.options = options
        self.stop_grace = stop_grace
        self.workers_per_host = int(options.workers_per_host)
        try:
            specs = [HostSpec.parse(str(h)) for h in options.hosts]
        except ValueError as e:
            raise ProviderError(str(e)) from e
        self.hosts = [_Host(spec, label) for spec, label in zip(specs, _labels(specs), strict=True)]
        self._slots: dict[str, _Slot] = {}
        self._targets: dict[str, Target] = {}  # by vm_type label, from preflight
        self._bundle_urls: dict[str, str] = {}  # url_for's answer -> stored key

    @classmethod
    def from_options(cls, options: ClusterOptions, cluster: str) -> SSHProvider:
        return cls(cluster, options)

    # -- lifecycle -----------------------------------------------------------------
    async def start(self) -> None:
        """Connect to every host at once; one error names every host that failed."""
        if not self.hosts:
            raise ProviderError(
                "provider='ssh' needs hosts: pass hosts=['user@host1', 'host2:2222', ...] "
                "or set them in the 'hosts' list of the rawvm.ssh config section"
            )
        if self.workers_per_host < 1:
            raise ProviderError(f"workers_per_host={self.workers_per_host} must be 1 or more")
        outcomes = await asyncio.gather(
            *(self._connect(h) for h in self.hosts), return_exceptions=True
        )
        failures = [str(o) for o in outcomes if isinstance(o, BaseException)]
        if failures:
            await self.close()
            raise ProviderError("cannot use SSH host(s): " + "; ".join(failures))

    async def close(self) -> None:
        for host in self.hosts:
            conn, host.conn = host.conn, None
            if conn is not None:
                conn.close()
                await conn.wait_closed()

    async def _connect(self, host: _Host) -> asyncssh.SSHClientConnection:
        kwargs: dict[str, Any] = dict(self.options.connect_options)
        if host.spec.port is not None:
            kwargs["port"] = host.spec.port
        if host.spec.username is not None:
            kwargs["username"] = host.spec.username
        timeout = float(kwargs.setdefault("connect_timeout", DEFAULT_CONNECT_TIMEOUT))
        name = host.spec.text
        try:
            # asyncssh's own connect_timeout covers TCP, key exchange and login; the
            # outer one is a backstop for anything it does not cover.
            conn = await asyncio.wait_for(asyncssh.connect(host.spec.host, **kwargs), timeout + 5)
        except asyncssh.HostKeyNotVerifiable as e:
            raise ProviderError(
                f"{name}: host key not trusted ({e.reason}). A host whose key is not in "
                "known_hosts, or differs from it, is refused: check the key "
                "(ssh-keyscan) and add it to ~/.ssh/known_hosts, or pass "
                "connect_options={'known_hosts': path}"
            ) from e
        except asyncssh.PermissionDenied as e:
            raise ProviderError(
                f"{name}: authentication failed ({e.reason}); keys come from your SSH "
                "agent, ~/.ssh/config and ~/.ssh/id_*, or connect_options="
                "{'client_keys': [...], 'username': ...}"
            ) from e
        except asyncssh.Error as e:
            raise ProviderError(f"{name}: SSH error: {e.reason}") from e
        except asyncio.TimeoutError as e:
            raise ProviderError(f"{name}: no SSH answer within {timeout:.0f} s") from e
        except OSError as e:
            raise ProviderError(f"{name}: cannot connect: {e.strerror or e}") from e
        peer = conn.get_extra_info("peername")
        # The address the others reach the host at: the one we reached it at (an
        # ssh-config alias resolves to it; the alias itself may mean nothing there).
        host.address = str(peer[0]) if peer else str(conn.get_extra_info("host") or "")
        host.conn = conn
        return conn

    async def _connection(self, host: _Host) -> asyncssh.SSHClientConnection:
        async with host.lock:
            if host.conn is None or host.conn.is_closed():
                logger.info("connecting to SSH host %s", host.spec.text)
                await self._connect(host)
            assert host.conn is not None
            return host.conn

    async def _run(self, host: _Host, script: str, what: str) -> str:
        """Run a POSIX sh script on a host; its output, or a ProviderError naming the host.

        The script goes on stdin to ``sh -s``, so the user's login shell (which
        runs the command line) may be any shell. A dropped connection is redialled
        once.
        """
        body = f"C={shlex.quote(self.cluster)}\n{_LIBRARY}\n{script}"
        for attempt in (1, 2):
            conn = await self._connection(host)
            try:
                result = await asyncio.wait_for(
                    conn.run("sh -s", input=body, encoding="utf-8", errors="replace"),
                    COMMAND_TIMEOUT,
                )
            except (asyncssh.Error, OSError, asyncio.TimeoutError) as e:
                conn.abort()
                host.conn = None
                if attempt == 2:
                    raise ProviderError(f"{host.spec.text}: {what} failed: {e!r}") from e
                continue
            if result.exit_status != 0:
                stderr = str(result.stderr or "").strip()[-2000:]
                raise ProviderError(
                    f"{host.spec.text}: {what} failed (exit {result.exit_status}): {stderr}"
                )
            return str(result.stdout or "")
        raise AssertionError("unreachable")

    # -- preflight -----------------------------------------------------------------
    async def preflight(self, roles: dict[str, str]) -> None:
        """Probe every host (one command each) and work out each role's target.

        Raises
        ------
        ProviderError
            For a host without a tool the bootstrap needs, without glibc, of an
            unsupported architecture, or worker hosts of different architectures.
        """
        await asyncio.gather(*(self._probe(h) for h in self.hosts))
        workers = self._combined_target(self.hosts, "worker")
        targets = {"worker": workers}
        if "scheduler" in roles:
            scheduler = self._combined_target(self.hosts[:1], "scheduler")
            # One bundle serves both when the architectures agree (the worker target
            # is the more conservative: oldest glibc; a CPU build runs anywhere).
            targets["scheduler"] = workers if scheduler.arch == workers.arch else scheduler
        self._targets = {}
        for role, vm_type in roles.items():
            earlier = self._targets.get(vm_type)
            if earlier is not None and earlier != targets[role]:
                raise ProviderError(
                    f"scheduler_vm_type and worker_vm_type are both {vm_type!r}, but the "
                    f"scheduler's host needs {targets['scheduler'].describe()} and the workers' "
                    f"{targets['worker'].describe()}: give them different labels"
                )
            self._targets[vm_type] = targets[role]
        for role, target in targets.items():
            logger.info("SSH %s hosts: %s", role, target.describe())

    async def _probe(self, host: _Host) -> None:
        if host.info:
            return
        dirname = shlex.quote(_safe_name(self.cluster))
        out = await self._run(host, f"CLUSTER_DIR={dirname}\n{_PROBE}", "probing the host")
        info: dict[str, str] = {}
        tools: set[str] = set()
        slots: list[str] = []
        for line in out.splitlines():
            if not line.startswith(_OUT + " ") or "=" not in line:
                continue
            key, _, value = line[len(_OUT) + 1 :].partition("=")
            if key == "has":
                tools.add(value)
            elif key == "slot":
                slots.append(value)
            else:
                info[key] = value.strip()
        missing = [t for t in REQUIRED_TOOLS if t not in tools]
        if not {"uv", "python3"} & tools:
            missing.append("uv or python3")
        if missing:
            raise ProviderError(
                f"{host.spec.text}: missing {', '.join(missing)}, which the bootstrap needs"
            )
        if not info.get("home", "").startswith("/"):
            raise ProviderError(f"{host.spec.text}: the login has no absolute $HOME")
        host.info, host.tools = info, tools
        # Slot numbers never repeat on a host, also across clients of one cluster.
        numbers = [int(s.rsplit("-", 1)[1]) for s in slots if re.fullmatch(r".*-\d+", s)]
        host.next_slot = max(host.next_slot, max(numbers, default=-1) + 1)

    def _host_target(self, host: _Host) -> Target:
        info = host.info
        versions = re.findall(r"\d+\.\d+", info.get("glibc", "").split("\n")[0])
        if not versions:
            raise ProviderError(
                f"{host.spec.text}: no glibc found ({info.get('glibc')!r}); the environment's "
                "manylinux wheels need a glibc-based Linux"
            )
        gpus = int(info.get("gpus") or 0)
        cuda = info.get("cuda") or ""
        try:
            return Target(
                arch=info.get("arch", ""),  # type: ignore[arg-type]
                accelerator="cuda" if gpus else "cpu",
                cuda_major=int(cuda) if gpus and cuda.isdigit() else None,
                python_version=f"{sys.version_info.major}.{sys.version_info.minor}",
                glibc=versions[-1],
            )
        except ValueError as e:
            raise ProviderError(f"{host.spec.text}: {e}") from e

    def _combined_target(self, hosts: list[_Host], role: str) -> Target:
        """One target for the hosts that will run ``role``: a bundle that runs on them all."""
        targets = {h.spec.text: self._host_target(h) for h in hosts}
        archs = {t.arch for t in targets.values()}
        if len(archs) > 1:
            listing = ", ".join(f"{name}: {t.arch}" for name, t in targets.items())
            raise ProviderError(
                f"the {role} hosts differ in architecture ({listing}); one cluster's workers "
                "must share one, for now: list hosts of one architecture"
            )
        cuda = [t for t in targets.values() if t.accelerator == "cuda"]
        if cuda and len(cuda) < len(targets):
            logger.warning("only some %s hosts have an NVIDIA GPU: building for CPU", role)
        glibc = min((t.glibc for t in targets.values()), key=_version_key)
        first = next(iter(targets.values()))
        if cuda and len(cuda) == len(targets):
            cuda_major = min(t.cuda_major or 12 for t in cuda)
            return dataclasses.replace(first, glibc=glibc, cuda_major=cuda_major)
        return dataclasses.replace(first, glibc=glibc, accelerator="cpu", cuda_major=None)

    def target_for(self, vm_type: str) -> Target:
        """The platform of the hosts that run the role ``vm_type`` was given for."""
        try:
            return self._targets[vm_type]
        except KeyError:
            raise ProviderError(f"no SSH host was probed for {vm_type!r}: run preflight") from None

    def worker_size(self, vm_type: str) -> WorkerSize | None:
        """A worker's share of a host: its CPUs and memory over ``workers_per_host``, on
        the smallest host (every worker gets the same spec); None if a host did not say."""
        sizes = []
        for host in self.hosts:
            cpus, memory_kib = host.info.get("cpus", ""), host.info.get("memory_kib", "")
            if not (cpus.isdigit() and memory_kib.isdigit()):
                return None
            sizes.append((int(cpus), int(memory_kib) * 1024))
        if not sizes:
            return None
        per_host = self.workers_per_host
        return WorkerSize(
            cpus=max(1, min(c for c, _ in sizes) // per_host),
            memory=min(m for _, m in sizes) // per_host,
        )

    def hourly_price(self, vm_type: str, market: str) -> float:
        """Nothing: the hosts are the user's already (the cost meter counts them at 0)."""
        return 0.0

    # -- capacity ----------------------------------------------------------------------
    @property
    def capacity(self) -> float:
        """Worker processes the host list allows at once."""
        return len(self.hosts) * self.workers_per_host

    def check_capacity(self, workers: int) -> None:
        """Raise a ProviderError if ``workers`` workers cannot all run at once."""
        if workers > self.capacity:
            raise ProviderError(
                f"asked for {workers} workers, but {len(self.hosts)} SSH host(s) x "
                f"workers_per_host={self.workers_per_host} allow {self.capacity}: add hosts, "
                f"raise workers_per_host, or ask for at most {self.capacity}"
            )

    def _busy(self, host: _Host) -> int:
        return sum(
            1 for s in self._slots.values() if s.host is host and s.role == "worker" and not s.gone
        )

    def _allocate(self, count: int) -> list[_Host]:
        """Hosts for ``count`` new workers, least busy first; all or nothing, no await."""
        busy = {id(h): self._busy(h) for h in self.hosts}
        free = sum(self.workers_per_host - n for n in busy.values())
        if count > free:
            in_use = len(self.hosts) * self.workers_per_host - free
            self.check_capacity(count + in_use)
        placements = []
        for _ in range(count):
            host = min(self.hosts, key=lambda h: busy[id(h)])
            busy[id(host)] += 1
            placements.append(host)
        return placements

    async def _refresh(self) -> None:
        """Free the slots whose processes ended on their own (a worker that retired)."""
        live = await self._live_ids([s.host for s in self._slots.values() if not s.gone])
        for slot in self._slots.values():
            if slot.machine.id not in live:
                slot.gone = True

    # -- machines ------------------------------------------------------------------
    async def launch(
        self,
        spec: LaunchSpec,
        on_late: OnLate | None = None,
        on_gave_up: OnGaveUp | None = None,
    ) -> list[Machine]:
        """Start ``spec.count`` processes running ``spec.user_data``, each in its own session.

        The scheduler goes to the first host; workers to the least busy hosts.
        All start, or none is left running.
        """
        if not self.hosts[0].info:
            await asyncio.gather(*(self._probe(h) for h in self.hosts))
        if spec.role == "scheduler":
            placements = [self.hosts[0]] * spec.count
        else:
            self.check_capacity(spec.count)
            if spec.count > sum(self.workers_per_host - self._busy(h) for h in self.hosts):
                await self._refresh()
            placements = self._allocate(spec.count)
        slots = [self._reserve(spec, host, i) for i, host in enumerate(placements)]
        by_host: dict[str, list[_Slot]] = {}
        for slot in slots:
            by_host.setdefault(slot.host.label, []).append(slot)
        outcomes = await asyncio.gather(
            *(self._start_slots(group, spec.user_data) for group in by_host.values()),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if failures:
            # All or nothing: what did start on other hosts is stopped again.
            try:
                await self.terminate([s.machine.id for s in slots])
            except ProviderError as e:
                logger.warning("could not stop the processes of a failed launch: %s", e)
            raise ProviderError("; ".join(str(f) for f in failures)) from failures[0]
        return [s.machine for s in slots]

    def _reserve(self, spec: LaunchSpec, host: _Host, index: int) -> _Slot:
        machine_id = f"ssh-{host.label}-{host.next_slot}"
        host.next_slot += 1
        machine = Machine(
            id=machine_id,
            launch_index=index,
            state="running",
            vm_type=spec.vm_type,
            private_ip=host.address,
            public_ip=host.address,
            zone=host.spec.text,
            tags={**spec.tags, CLUSTER_TAG: self.cluster, ROLE_TAG: spec.role},
        )
        slot = _Slot(machine, host, spec.role)
        self._slots[machine_id] = slot
        return slot

    async def _start_slots(self, slots: list[_Slot], user_data: str) -> None:
        """One command on one host: write each slot's files and start its process."""
        host = slots[0].host
        script = self._script_for(host, user_data)
        directory = shlex.quote(self._cluster_dir(host))
        lines = ["umask 077", f"D={directory}", 'mkdir -p "$D" && cd "$D" || exit 1']
        for slot in slots:
            lines += self._start_lines(slot, script)
        ids = " ".join(shlex.quote(s.machine.id) for s in slots)
        # Seen by their marker before we return, so describe() never misses a process
        # between its fork and its exec; one that died at once is an error, with its log.
        lines.append(f"""
n=0
while :; do
    missing=""
    live=$(rawvm_ps)
    for id in {ids}; do
        echo "$live" | awk -v id="$id" '$2 == id {{ f = 1 }} END {{ exit !f }}' \\
            || missing="$missing $id"
    done
    [ -z "$missing" ] && exit 0
    n=$((n + 1))
    if [ $n -ge 100 ]; then
        for id in $missing; do echo "$id did not start:"; tail -n 15 "$D/$id.log"; done >&2
        exit 3
    fi
    sleep 0.05
done""")
        await self._run(host, "\n".join(lines), f"starting {len(slots)} process(es)")
        for slot in slots:
            logger.debug("started %s on %s", slot.machine.id, host.spec.text)

    def _start_lines(self, slot: _Slot, script: str) -> list[str]:
        machine = slot.machine
        delimiter = f"RAWVM_EOF_{uuid.uuid4().hex}"
        meta = {"role": slot.role, "launch_index": machine.launch_index, "tags": machine.tags}
        variables = {
            "RAWVM_SSH_CLUSTER": self.cluster,
            "RAWVM_INSTANCE_ID": machine.id,
            "RAWVM_ADDRESS": slot.host.address,
            "RAWVM_LAUNCH_INDEX": str(machine.launch_index),
            "RAWVM_POWEROFF": "no",  # a shared host is never powered off
            "PYTHONUNBUFFERED": "1",  # the log shows what happened up to a crash
        }
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in variables.items())
        name = shlex.quote(machine.id)
        return [
            f"cat > {name}.sh <<'{delimiter}'",
            script.rstrip("\n"),
            delimiter,
            f"printf '%s\\n' {shlex.quote(json.dumps(meta))} > {name}.json",
            # Its own session (setsid), immune to the SSH session's end (nohup, all
            # three streams redirected): a dropped connection orphans nothing, and
            # the Dask process's own death/idle timeouts still apply.
            f'{env} setsid nohup bash "$D/{machine.id}.sh" > "$D/{machine.id}.log" 2>&1 '
            "< /dev/null &",
        ]

    def _script_for(self, host: _Host, user_data: str) -> str:
        """The bootstrap as this host runs it: its own bundle path, and a shared-venv lock."""
        lines = user_data.splitlines()
        for i, line in enumerate(lines):
            if line.startswith("RAWVM_BUNDLE_URL="):
                value = shlex.split(line.partition("=")[2])
                key = self._bundle_urls.get(value[0]) if value else None
                if key is not None:
                    lines[i] = "RAWVM_BUNDLE_URL=" + shlex.quote(self._bundle_url(host, key))
        return "\n".join(lines) + "\n"

    async def terminate(self, ids: list[str]) -> None:
        """SIGTERM each slot's processes now, SIGKILL what is left after the grace period.

        Returns at once: the escalation runs detached on the host.
        """
        by_host = self._by_host(ids)
        for slot_id in ids:
            if slot_id in self._slots:
                self._slots[slot_id].gone = True
        outcomes = await asyncio.gather(
            *(self._stop_detached(host, slot_ids) for host, slot_ids in by_host),
            return_exceptions=True,
        )
        failures = [str(o) for o in outcomes if isinstance(o, BaseException)]
        if failures:
            raise ProviderError("; ".join(failures))

    async def _stop_detached(self, host: _Host, ids: list[str]) -> None:
        args = " ".join(shlex.quote(i) for i in ids)
        # The cluster's name reaches the detached stopper by a variable of another
        # name, so the stopper never carries the marker it kills by.
        stop = f'C="$RAWVM_STOP_CLUSTER"\nrawvm_stop {self.stop_grace} "$@"'
        stopper = shlex.quote(f"{_LIBRARY}\n{stop}")
        script = (
            f'pids=$(rawvm_pids {args}); [ -z "$pids" ] || kill -TERM $pids 2>/dev/null\n'
            f'RAWVM_STOP_CLUSTER="$C" setsid nohup sh -c {stopper} rawvm-stop {args} '
            "> /dev/null 2>&1 < /dev/null &\n"
        )
        await self._run(host, script, f"stopping {len(ids)} process(es)")

    async def describe(self, ids: list[str]) -> list[Machine]:
        """Each slot is ``running`` while any process of it lives, else ``terminated``."""
        live = await self._live_ids([h for h, _ in self._by_host(ids)])
        machines = []
        for slot_id in ids:
            slot = self._slots.get(slot_id)
            if slot is None:
                machines.append(Machine(slot_id, 0, "terminated", "unknown"))
                continue
            if slot_id not in live:
                slot.gone = True
            state = "running" if slot_id in live else "terminated"
            slot.machine = dataclasses.replace(slot.machine, state=state)
            machines.append(slot.machine)
        return machines

    async def _live_ids(self, hosts: list[_Host]) -> set[str]:
        unique = list({id(h): h for h in hosts}.values())
        outputs = await asyncio.gather(
            *(self._run(h, 'rawvm_ps | sed "s/^/@rawvm /"', "listing processes") for h in unique)
        )
        return {pid_id[1] for out in outputs for pid_id in _parse_ps(out)}

    async def live_machines(self, cluster: str) -> list[Machine]:
        """Every slot of ``cluster`` with a live process, on every host, with its tags."""
        if cluster != self.cluster:
            return await self._as_other(cluster, "live_machines")
        outcomes = await asyncio.gather(*(self._live_on(h) for h in self.hosts))
        return [m for machines in outcomes for m in machines]

    async def _as_other(self, cluster: str, method: str) -> Any:
        """``method(cluster)`` by a provider of the same hosts for another cluster."""
        other = SSHProvider(cluster, self.options, self.stop_grace)
        await other.start()
        try:
            return await getattr(other, method)(cluster)
        finally:
            await other.close()

    async def _live_on(self, host: _Host) -> list[Machine]:
        await self._probe(host)
        script = f"""
D={shlex.quote(self._cluster_dir(host))}
rawvm_ps | while read -r p i; do
    [ -f "$D/$i.json" ] || continue  # this host's slots (hosts may share a kernel in tests)
    echo "@rawvm $p $i"
    echo "@rawvm meta $i $(cat "$D/$i.json")"
done
exit 0
"""
        out = await self._run(host, script, "listing processes")
        metas: dict[str, dict[str, Any]] = {}
        live: set[str] = set()
        for line in out.splitlines():
            parts = line.split(" ", 3)
            if parts[0] != _OUT or len(parts) < 3:
                continue
            if parts[1] == "meta" and len(parts) == 4:
                try:
                    metas[parts[2]] = json.loads(parts[3])
                except json.JSONDecodeError:
                    logger.warning("%s: unreadable metadata of %s", host.spec.text, parts[2])
            else:
                live.add(parts[2])
        machines = []
        for slot_id in sorted(live):
            meta = metas.get(slot_id, {})
            slot = self._slots.get(slot_id)
            if slot is None:
                tags = {**meta.get("tags", {}), CLUSTER_TAG: self.cluster}
                machine = Machine(
                    id=slot_id,
                    launch_index=int(meta.get("launch_index", 0)),
                    state="running",
                    vm_type="ssh",
                    private_ip=host.address,
                    public_ip=host.address,
                    zone=host.spec.text,
                    tags=tags,
                )
                slot = _Slot(machine, host, str(tags.get(ROLE_TAG, meta.get("role", "worker"))))
                self._slots[slot_id] = slot
            machines.append(slot.machine)
        return machines

    async def cleanup(self, cluster: str) -> list[str]:
        """Stop every process of ``cluster`` on every host, wait for them, remove its files.

        Raises
        ------
        ProviderError
            Naming each host that could not be cleaned (the others are cleaned).
        """
        if cluster != self.cluster:
            return await self._as_other(cluster, "cleanup")
        outcomes = await asyncio.gather(
            *(self._cleanup_host(h) for h in self.hosts), return_exceptions=True
        )
        ids: list[str] = []
        failures = []
        for host, outcome in zip(self.hosts, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                logger.error("could not clean up %s on %s: %s", cluster, host.spec.text, outcome)
                failures.append(str(outcome))
            else:
                ids += outcome
        for slot in self._slots.values():
            slot.gone = True
        if failures:
            raise ProviderError("cleanup incomplete: " + "; ".join(failures))
        return sorted(set(ids))

    def cleanup_blocking(self, timeout: float = 60.0) -> list[str]:
        """:meth:`cleanup` from synchronous code with no usable event loop.

        For an unclosed cluster at garbage collection or interpreter exit: new
        connections, on a private event loop in a thread of its own, resolving
        host names inline (executors refuse work at interpreter exit).
        """
        result: list[str] = []

        async def run() -> None:
            asyncio.get_running_loop().set_default_executor(_InlineExecutor())
            other = SSHProvider(self.cluster, self.options, self.stop_grace)
            try:
                await other.start()
                result.extend(await other.cleanup(self.cluster))
            finally:
                await other.close()

        errors: list[BaseException] = []
        thread = threading.Thread(
            target=lambda: _capture(errors, lambda: asyncio.run(run())),
            name=f"dask-rawvm-ssh-cleanup-{self.cluster}",
            daemon=True,
        )
        thread.start()
        thread.join(timeout)
        if errors:
            raise ProviderError(f"cleanup of {self.cluster} failed: {errors[0]}") from errors[0]
        if thread.is_alive():
            raise ProviderError(f"cleanup of {self.cluster} took over {timeout:.0f} s")
        return result

    async def _cleanup_host(self, host: _Host) -> list[str]:
        await self._probe(host)
        directory = shlex.quote(self._cluster_dir(host))
        script = f"""
rawvm_ps | sed "s/^/@rawvm /"
rawvm_stop {self.stop_grace} || {{ echo "processes of the cluster survived SIGKILL" >&2; exit 4; }}
rm -rf -- {directory}
"""
        out = await self._run(host, script, "cleaning up")
        return sorted({slot_id for _, slot_id in _parse_ps(out)})

    # -- files for the hosts -------------------------------------------------------------
    async def store(self, key: str, path: str) -> None:
        """Copy a file (an environment bundle) to every host's cache, by SFTP.

        The cache is content-addressed (the key holds the bundle's digest), so a
        host that already has a file of that name and size keeps it.
        """
        _check_key(key)
        await asyncio.gather(*(self._probe(h) for h in self.hosts))
        await asyncio.gather(*(self._upload(h, key, path) for h in self.hosts))

    async def _upload(self, host: _Host, key: str, path: str) -> None:
        remote = self._bundle_path(host, key)
        size = os.path.getsize(path)
        conn = await self._connection(host)
        try:
            async with conn.start_sftp_client() as sftp:
                try:
                    if (await sftp.stat(remote)).size == size:
                        logger.info("%s: %s already cached", host.spec.text, key)
                        return
                except asyncssh.SFTPNoSuchFile:
                    pass
                await sftp.makedirs(str(PurePosixPath(remote).parent), exist_ok=True)
                # Under a temporary name, then renamed: another cluster fetching the
                # same bundle never sees half a file.
                partial = f"{remote}.partial-{uuid.uuid4().hex[:8]}"
                await sftp.put(path, partial)
                await sftp.posix_rename(partial, remote)
        except (asyncssh.Error, OSError) as e:
            raise ProviderError(f"{host.spec.text}: copying {key} failed: {e}") from e
        logger.info("%s: copied %s (%d bytes)", host.spec.text, key, size)

    async def fetch(self, key: str) -> bytes:
        """A stored file, read back from the first host's cache by SFTP."""
        _check_key(key)
        host = self.hosts[0]
        await self._probe(host)
        remote = self._bundle_path(host, key)
        conn = await self._connection(host)
        try:
            async with conn.start_sftp_client() as sftp, sftp.open(remote, "rb") as f:
                data: bytes = await f.read()
                return data
        except (asyncssh.Error, OSError) as e:
            raise ProviderError(f"{host.spec.text}: reading {key} failed: {e}") from e

    async def url_for(self, key: str, expires: int = 3600) -> str:
        """A ``file://`` URL of a stored file, on the first host.

        Hosts whose home differs get their own path in :meth:`launch`. Nothing
        expires: the file is in the user's own cache.
        """
        url = self._bundle_url(self.hosts[0], key)
        self._bundle_urls[url] = key
        return url

    def _bundle_path(self, host: _Host, key: str) -> str:
        return f"{host.home}/.cache/dask-rawvm/bundles/{key}"

    def _bundle_url(self, host: _Host, key: str) -> str:
        return PurePosixPath(self._bundle_path(host, key)).as_uri()

    def _cluster_dir(self, host: _Host) -> str:
        return f"{host.home}/.cache/dask-rawvm/ssh/{_safe_name(self.cluster)}"

    async def console_output(self, machine_id: str) -> str:
        """The end of a slot's log (its bootstrap and Dask process), read over SSH."""
        slot = self._slots.get(machine_id)
        if slot is None:
            return ""
        log = shlex.quote(f"{self._cluster_dir(slot.host)}/{machine_id}.log")
        out = await self._run(
            slot.host, f"tail -c {LOG_TAIL_BYTES} {log} 2>/dev/null; exit 0", "reading the log"
        )
        return out

    def _by_host(self, ids: list[str]) -> list[tuple[_Host, list[str]]]:
        groups: dict[str, tuple[_Host, list[str]]] = {}
        for slot_id in ids:
            slot = self._slots.get(slot_id)
            if slot is not None:
                groups.setdefault(slot.host.label, (slot.host, []))[1].append(slot_id)
        return list(groups.values())


class _InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each call at once in the caller: what still works at interpreter exit.

    A ThreadPoolExecutor only because asyncio's default executor must be one; it
    never starts a thread.
    """

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as e:
            future.set_exception(e)
        return future


def _capture(errors: list[BaseException], call: Any) -> None:
    try:
        call()
    except BaseException as e:
        errors.append(e)


def _parse_ps(out: str) -> list[tuple[str, str]]:
    """``@rawvm pid id`` lines -> (pid, id)."""
    pairs = []
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == _OUT:
            pairs.append((parts[1], parts[2]))
    return pairs


def _labels(specs: list[HostSpec]) -> list[str]:
    """A distinct label per host (``alice@h`` and ``bob@h`` are two hosts)."""
    labels: list[str] = []
    for spec in specs:
        label = spec.label
        if label in labels:
            label = f"{label}-{len(labels)}"
        labels.append(label)
    return labels


def _safe_name(name: str) -> str:
    """A cluster name as a directory name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", name).lstrip(".")
    return safe or "_"


def _check_key(key: str) -> None:
    if key.startswith("/") or ".." in PurePosixPath(key).parts:
        raise ProviderError(f"refusing to store outside the cache: {key!r}")


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in version.split("."))
