"""Local VMs sized like their instance type: a cgroup per VM with the type's vCPUs and memory.

On EC2 a t3.large has 2 vCPUs and 8 GiB; a local VM is a process group on this machine and
would see all of it, so three "t3.large" workers would promise three times this machine's
memory. Dask sizes itself from what it sees: distributed's ``memory_limit="auto"`` and
dask's CPU count take the smaller of the machine's and the cgroup's limits, read at the
cgroup filesystem's root (``/sys/fs/cgroup/memory/memory.limit_in_bytes``;
``/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``). So each VM gets

- a ``memory`` and a ``cpu`` cgroup (v1) limited to its type's memory and vCPUs (a CFS
  quota of ``vcpus`` periods per period), from moto's DescribeInstanceTypes data;
- its own cgroup namespace and mount view (:mod:`.vmlaunch`), in which those cgroups are
  mounted at the root paths Dask reads: inside, the VM's cgroup *is* the root.

A vCPU quota caps CPU time, not the CPUs a VM sees: a type with more vCPUs than this machine
has CPUs reports this machine's count, as ``min(CPUs, quota)`` is what Dask computes.

The cgroups live under this process's own (so whatever limits this process, like a
supervisor's cgroup, still covers its VMs), at
``<controller>/<own cgroup>/dask-rawvm-localcloud/<pid>-<start time>-<account>/<instance>``.
A VM's cgroups go when it halts, a cloud's when it closes (or, if its owner died, by its
watchdog), and those of owners that are gone at the next LocalCloud start.

Where the v1 ``memory`` and ``cpu`` controllers are not mounted or not writable (cgroup v2
hosts, unprivileged users), VMs are not sized and :func:`sizing_unavailable` says why.
"""

from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass
from pathlib import Path

from dask_rawvm.localcloud.lifetime import (
    empty_and_remove_cgroup,
    owner_identity,
    process_start_time,
)

#: The controllers a VM is limited by.
CONTROLLERS = ("memory", "cpu")

#: The directory, under this process's cgroup, that holds local clouds' cgroups.
TREE = "dask-rawvm-localcloud"

#: Where a VM's view mounts its cgroups, under ``/sys/fs/cgroup``: the directories dask
#: reads (``cpu,cpuacct``: systemd's co-mounted name; ``cpu`` and ``cpuacct`` link to it).
VIEW_DIRECTORIES = {"memory": "memory", "cpu": "cpu,cpuacct"}

#: CFS period (µs): the kernel's default; the quota is ``vcpus`` times it.
CFS_PERIOD_US = 100_000


@dataclass(frozen=True)
class InstanceSize:
    """What EC2 gives an instance type."""

    vcpus: int
    memory_mib: int


@functools.cache
def instance_size(instance_type: str) -> InstanceSize | None:
    """vCPUs and memory of ``instance_type`` as DescribeInstanceTypes reports them.

    None for a type moto does not know (it launches bogus types unless validation is on).
    """
    from moto.ec2.models.instance_types import INSTANCE_TYPES

    info = INSTANCE_TYPES.get(instance_type)
    if info is None:
        return None
    return InstanceSize(int(info["VCpuInfo"]["DefaultVCpus"]), int(info["MemoryInfo"]["SizeInMiB"]))


def _v1_mounts() -> dict[str, tuple[Path, str]]:
    """Mount point and mount root of each v1 controller we use, from ``/proc/self/mountinfo``."""
    mounts: dict[str, tuple[Path, str]] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            fields, _, tail = line.partition(" - ")
            fstype, _, super_options = tail.split()[:3]
            if fstype != "cgroup":
                continue
            root, mount_point = fields.split()[3:5]
            for controller in CONTROLLERS:
                if controller in super_options.split(","):
                    mounts.setdefault(controller, (Path(mount_point), root))
    return mounts


def _own_cgroups() -> dict[str, str]:
    """This process's cgroup path in each v1 hierarchy, from ``/proc/self/cgroup``."""
    own = {}
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            for controller in controllers.split(","):
                own[controller] = path
    return own


def _tree_directories() -> dict[str, Path]:
    """Where this process keeps local clouds' cgroups, per controller (raises OSError)."""
    mounts, own = _v1_mounts(), _own_cgroups()
    directories = {}
    for controller in CONTROLLERS:
        if controller not in mounts or controller not in own:
            raise OSError(f"no cgroup v1 '{controller}' controller is mounted")
        mount_point, root = mounts[controller]
        path = own[controller]
        if not (path + "/").startswith(root.rstrip("/") + "/"):
            raise OSError(f"this process's {controller} cgroup {path} is outside its mount")
        relative = path[len(root.rstrip("/")) :].lstrip("/")
        directories[controller] = mount_point / relative / TREE
    return directories


@functools.cache
def sizing_unavailable() -> str | None:
    """Why VMs cannot be sized on this machine, or None when they can.

    Cached per process: it probes by creating (and keeping) the cgroup tree directories.
    """
    try:
        directories = _tree_directories()
        for directory in directories.values():
            directory.mkdir(exist_ok=True)
            probe = directory / f"probe-{os.getpid()}"
            probe.mkdir(exist_ok=True)
            probe.rmdir()
    except OSError as error:
        if Path("/sys/fs/cgroup/cgroup.controllers").exists():
            return f"cgroup v2 is not supported yet ({error})"
        return f"cgroups are not writable here: {error}"
    return None


@dataclass
class VMCgroups:
    """One VM's cgroups, one directory per controller."""

    directories: dict[str, Path]

    def attach(self, pid: int) -> None:
        """Move process ``pid`` (the VM's first, before it runs anything) into them."""
        for directory in self.directories.values():
            (directory / "cgroup.procs").write_text(str(pid))

    def remove(self) -> bool:
        """Kill what is left in them and remove them (idempotent); False if some stayed."""
        return all([empty_and_remove_cgroup(d) for d in self.directories.values()])

    def limits(self) -> InstanceSize:
        """The limits as the kernel holds them."""
        quota = int((self.directories["cpu"] / "cpu.cfs_quota_us").read_text())
        period = int((self.directories["cpu"] / "cpu.cfs_period_us").read_text())
        memory = int((self.directories["memory"] / "memory.limit_in_bytes").read_text())
        return InstanceSize(-(-quota // period), memory >> 20)


class CloudCgroups:
    """The cgroups of one local cloud's VMs.

    Parameters
    ----------
    account_id
        The cloud's moto account, part of its cgroups' name.
    """

    def __init__(self, account_id: str) -> None:
        identity = owner_identity()
        self.name = f"{identity['pid']}-{identity['start_time']}-{account_id}"
        self.directories = {c: d / self.name for c, d in _tree_directories().items()}
        for directory in self.directories.values():
            directory.mkdir()

    def create(self, instance_id: str, size: InstanceSize) -> VMCgroups:
        """Cgroups for ``instance_id`` limited to ``size``."""
        vm = VMCgroups({c: d / instance_id for c, d in self.directories.items()})
        try:
            for directory in vm.directories.values():
                directory.mkdir(exist_ok=True)
            cpu = vm.directories["cpu"]
            (cpu / "cpu.cfs_period_us").write_text(str(CFS_PERIOD_US))
            (cpu / "cpu.cfs_quota_us").write_text(str(size.vcpus * CFS_PERIOD_US))
            memory = vm.directories["memory"]
            (memory / "memory.limit_in_bytes").write_text(str(size.memory_mib << 20))
        except OSError:
            vm.remove()
            raise
        return vm

    def remove(self) -> bool:
        """Remove every cgroup of this cloud (its VMs' processes are killed)."""
        return all([empty_and_remove_cgroup(d) for d in self.directories.values()])


def reap_stale_cgroups() -> list[str]:
    """Remove the cgroups of local clouds whose owner is gone; returns their names."""
    try:
        trees = _tree_directories()
    except OSError:
        return []
    reaped = []
    for tree in trees.values():
        with contextlib.suppress(OSError):
            for entry in os.scandir(tree):
                pid, _, rest = entry.name.partition("-")
                start_time, _, _ = rest.partition("-")
                if not (pid.isdigit() and start_time.isdigit()) or not entry.is_dir():
                    continue
                # Under this process's own cgroup: owners of this machine and pid namespace.
                if process_start_time(int(pid)) != int(start_time):
                    empty_and_remove_cgroup(Path(entry.path))
                    reaped.append(entry.name)
    return reaped
