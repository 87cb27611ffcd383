"""Nothing of a local cloud outlives the process that owns it, however that process ends.

A local cloud's VMs are process groups in sessions of their own (a VM must survive a
Ctrl-C of its client's terminal, as an EC2 VM does), and its working directory holds the
VMs' files. When the owner closes the cloud it halts them itself; when the owner dies
without closing (SIGKILL, an unhandled SIGTERM, a crash), a watchdog does:

- the watchdog is a small process started with the cloud, in a session of its own: this
  file, run by path as ``python -I -S lifetime.py`` (so it imports the standard library
  only, and costs ~10 MiB, not the ~100 MiB of an importing ``dask_rawvm``);
- its stdin is a pipe whose only write end the owner holds (Python's file descriptors are
  not inherited by children, PEP 446): the kernel closes that end when the owner dies, and
  the watchdog reads end-of-file at once;
- over the same pipe the owner tells it each VM's process group before the VM runs any of
  its own code (the runtime's gate), each cgroup to empty and the directory to remove;
- at end-of-file it sends SIGTERM to every group it knows, SIGKILL after a grace, kills what
  is left in the cgroups (a process that left its group with ``setsid`` is still in its
  cgroup), removes the cgroups and the directory, and exits. An owner that closes its cloud
  says ``release`` first: the watchdog then exits without touching anything.

Second line of defence, for a watchdog killed along with its owner: an owned working
directory records its owner (:func:`write_owner_record`) and every LocalCloud start removes
those of owners that are gone (:func:`reap_stale_directories`).

Only the standard library here: the module also runs as the watchdog's script.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

#: The owner record in an owned working directory.
OWNER_RECORD = "owner.json"

#: Seconds the watchdog gives VMs between SIGTERM and SIGKILL: the runtime's own
#: ``shutdown_grace`` is 3 s, but the owner is gone, so nobody awaits a clean exit.
TERM_GRACE = 2.0

#: Seconds to wait for the kernel to empty a cgroup of killed processes before giving up
#: removing it (an exiting process leaves its cgroup within milliseconds; 5 s is ample).
CGROUP_EMPTY_TIMEOUT = 5.0


# -- who owns what ---------------------------------------------------------------------
def process_start_time(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (None when there is no such process).

    A pid alone does not name a process for long: pids are reused. Pid and start time do.
    """
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] == b"Z":  # a zombie has ended; only its parent has not noticed yet
        return None
    return int(fields[19])  # field 22 of proc(5): starttime


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return ""


def owner_identity(pid: int | None = None) -> dict[str, object]:
    """What identifies a (by default this) process on this machine, for :func:`owner_gone`."""
    pid = os.getpid() if pid is None else pid
    return {
        "pid": pid,
        "start_time": process_start_time(pid),
        "boot_id": _boot_id(),
        "pid_namespace": _pid_namespace(),
    }


def owner_gone(identity: dict[str, object]) -> bool:
    """Whether the process ``identity`` names has certainly ended.

    Only a "certainly" is acted on: a record from another pid namespace (a container sharing
    this ``/tmp``) is never judged gone, since its pid means nothing here.
    """
    if identity.get("boot_id") and identity["boot_id"] != _boot_id():
        return True  # the machine rebooted since
    if identity.get("pid_namespace") != _pid_namespace():
        return False
    pid = identity.get("pid")
    if not isinstance(pid, int):
        return False
    return process_start_time(pid) != identity.get("start_time")


def write_owner_record(directory: Path) -> None:
    """Record in ``directory`` that this process owns it."""
    (directory / OWNER_RECORD).write_text(json.dumps(owner_identity()))


def reap_stale_directories(parent: Path, prefix: str) -> list[Path]:
    """Remove the directories ``parent/prefix*`` whose recorded owner is gone.

    A directory without an owner record is left alone: it is not known to be ours.

    Returns
    -------
    list of Path
        The directories removed.
    """
    removed = []
    with contextlib.suppress(OSError):
        for entry in os.scandir(parent):
            if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
                continue
            try:
                identity = json.loads(Path(entry.path, OWNER_RECORD).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(identity, dict) and owner_gone(identity):
                shutil.rmtree(entry.path, ignore_errors=True)
                removed.append(Path(entry.path))
    return removed


# -- cgroups (v1): what the watchdog and the runtime both do to them ---------------------------
def _cgroup_tree(directory: Path) -> list[Path]:
    """``directory`` and every cgroup below it, deepest first."""
    tree = [Path(root) for root, _, _ in os.walk(directory)]
    return sorted(tree, key=lambda p: len(p.parts), reverse=True)


def cgroup_processes(directory: Path) -> list[int]:
    """The processes in the cgroup ``directory`` and below it."""
    pids: list[int] = []
    for group in _cgroup_tree(directory):
        with contextlib.suppress(OSError, ValueError):
            pids.extend(int(line) for line in (group / "cgroup.procs").read_text().split())
    return pids


def empty_and_remove_cgroup(directory: Path, timeout: float = CGROUP_EMPTY_TIMEOUT) -> bool:
    """SIGKILL every process in the cgroup ``directory`` (and below), then remove it.

    Returns
    -------
    bool
        Whether the cgroup is gone (False when processes outlived ``timeout``).
    """
    deadline = time.monotonic() + timeout
    while directory.exists():
        for pid in cgroup_processes(directory):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for group in _cgroup_tree(directory):
            # EBUSY while the kernel has not yet moved a dying process out.
            with contextlib.suppress(FileNotFoundError, OSError):
                group.rmdir()
        if not directory.exists():
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- the watchdog ------------------------------------------------------------------------
def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _signal_groups(groups: Iterable[int], sig: int) -> None:
    for pgid in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def clean_up(groups: set[int], cgroups: list[Path], directories: list[Path]) -> None:
    """End the VMs of a cloud whose owner died: the watchdog's work at end-of-file."""
    _signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + TERM_GRACE
    while any(_group_alive(g) for g in groups) and time.monotonic() < deadline:
        time.sleep(0.05)
    _signal_groups(groups, signal.SIGKILL)
    for cgroup in cgroups:
        empty_and_remove_cgroup(cgroup)
    for directory in directories:
        shutil.rmtree(directory, ignore_errors=True)


def watch(lines: Iterable[bytes]) -> None:
    """Follow the owner's messages until end-of-file, then clean up unless released."""
    groups: set[int] = set()
    cgroups: list[Path] = []
    directories: list[Path] = []
    for line in lines:
        verb, _, argument = line.decode().rstrip("\n").partition(" ")
        if verb == "group":
            groups.add(int(argument))
        elif verb == "ended":
            groups.discard(int(argument))
        elif verb == "cgroup":
            cgroups.append(Path(argument))
        elif verb == "directory":
            directories.append(Path(argument))
        elif verb == "release":
            return
    clean_up(groups, cgroups, directories)


class Watchdog:
    """The owner's end of a cloud's watchdog process (see the module docstring).

    A process forked from the owner (``multiprocessing`` with ``fork``) holds the pipe's
    write end too, so the watchdog acts only once that child has ended as well.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._broken = False
        self.process = subprocess.Popen(
            [sys.executable, "-I", "-S", os.path.abspath(__file__)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _send(self, *lines: str) -> None:
        data = "".join(f"{line}\n" for line in lines).encode()
        with self._lock:
            if self._broken or self.process.stdin is None:
                return
            try:
                # One write per message, under PIPE_BUF (4 KiB): never interleaved.
                os.write(self.process.stdin.fileno(), data)
            except OSError as error:
                self._broken = True
                print(
                    f"local cloud: its watchdog is gone ({error}); VMs will not be halted "
                    "if this process dies without closing the cloud",
                    file=sys.stderr,
                )

    def watch_group(self, pgid: int) -> None:
        """End process group ``pgid`` if the owner dies."""
        self._send(f"group {pgid}")

    def forget_group(self, pgid: int) -> None:
        """Process group ``pgid`` has ended: never signal it (its id may be reused)."""
        self._send(f"ended {pgid}")

    def watch_cgroup(self, directory: Path) -> None:
        """Empty and remove the cgroup ``directory`` if the owner dies."""
        self._send(f"cgroup {directory}")

    def watch_directory(self, directory: Path) -> None:
        """Remove ``directory`` if the owner dies."""
        self._send(f"directory {directory}")

    def release(self, timeout: float = 5.0) -> None:
        """The owner cleaned up itself: let the watchdog exit without acting (idempotent)."""
        self._send("release")
        with self._lock:
            self._broken = True
            if self.process.stdin is not None:
                with contextlib.suppress(OSError):
                    self.process.stdin.close()
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main() -> None:
    # A Ctrl-C meant for the client's terminal is not for the watchdog (its own session
    # already keeps it out of the terminal's process group; this covers a shared tty).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    watch(sys.stdin.buffer)


if __name__ == "__main__":
    main()
