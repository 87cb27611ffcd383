"""The first process of a local VM: waits for its owner, enters its view, becomes its boot script.

The runtime starts every VM as ``python -I -S vmlaunch.py SPEC`` (run by path: the standard
library only, ~30 ms) in a new session, and this process

1. waits on the *gate*, its stdin: a pipe from the owner, who writes a line once it has put
   the VM in its cgroups and told the cloud's watchdog about it (:mod:`.lifetime`). An
   owner that dies first closes the pipe: the VM exits before running anything, so no VM
   ever escapes its watchdog. Then its stdin is ``/dev/null``, as cloud-init's scripts';
2. when the VM has a *view*: enters a mount namespace of its own (and a cgroup namespace,
   for a sized VM) and rearranges what it sees there, without touching this machine's:

   - ``tmpfs``: empty, writable, private directories (``/tmp``, ``/dev/shm``: as on Amazon
     Linux, where ``/tmp`` is a tmpfs);
   - ``hide``: directories covered by an empty read-only tmpfs (the client's working
     directory, home and virtualenv; the base interpreter's site-packages);
   - ``keep``: directories under those that stay usable, bound back at the same path
     (the base interpreter, the VM's own directory, the image's directories);
   - ``mask``: files covered by another file (``/usr/bin/pip`` by ``/dev/null``,
     ``/usr/bin/python3`` by the image's ``python3``);
   - ``cgroups``: a fresh tmpfs at ``/sys/fs/cgroup`` with the VM's own cgroups mounted
     where Dask reads its limits (:mod:`.sizing`);
3. becomes the boot script (``execv``): same pid, so the runtime's process group and
   ``Popen`` are the VM's.

``python vmlaunch.py --probe`` exits 0 where all of that works (as root with mount
namespaces), and prints why not otherwise.
"""

from __future__ import annotations

import ctypes
import marshal
import os
import stat
import sys

# Every import here is paid at every VM's boot: the spec comes marshalled, not as JSON (json
# imports re: 16 of this script's 60 ms), and typing is for the type checker only.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TypedDict

    class View(TypedDict, total=False):
        """How a VM's view differs from this machine's (see the module docstring)."""

        tmpfs: list[str]
        hide: list[str]
        keep: list[tuple[str, bool]]  # (path, read-only)
        mask: list[tuple[str, str]]  # (file, the file covering it)
        cgroups: dict[str, str]  # controller -> directory name under /sys/fs/cgroup

    class Spec(TypedDict):
        """What the runtime hands a VM's first process (:func:`encode`)."""

        cwd: str
        argv: list[str]  # the boot script
        view: View | None


CLONE_NEWNS = 0x00020000
CLONE_NEWCGROUP = 0x02000000
MS_RDONLY = 0x1
MS_NOSUID = 0x2
MS_NODEV = 0x4
MS_REMOUNT = 0x20
MS_BIND = 0x1000
MS_REC = 0x4000
MS_PRIVATE = 0x40000

_libc = ctypes.CDLL(None, use_errno=True)


def encode(spec: Spec) -> str:
    """``spec`` as this script's argument (marshal: the same interpreter reads it)."""
    return marshal.dumps(dict(spec)).hex()


def command(spec: Spec) -> list[str]:
    """The command line of a VM's first process."""
    return [sys.executable, "-I", "-S", os.path.abspath(__file__), encode(spec)]


def _check(result: int, what: str) -> None:
    if result != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def _mount(source: str | None, target: str, fstype: str | None, flags: int, data: str = "") -> None:
    _check(
        _libc.mount(
            source.encode() if source else None,
            target.encode(),
            fstype.encode() if fstype else None,
            ctypes.c_ulong(flags),
            data.encode() if data else None,
        ),
        f"mount {source or fstype} on {target}",
    )


def _unshare(flags: int) -> None:
    _check(_libc.unshare(ctypes.c_int(flags)), "unshare")


def _bind(fd: int, target: str, readonly: bool) -> None:
    # The source is the directory (or file) opened before anything covered its path.
    _mount(f"/proc/self/fd/{fd}", target, None, MS_BIND)
    if readonly:
        _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID)


def _readonly(target: str) -> None:
    _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV)


def enter_view(view: View) -> None:
    """Enter a mount (and cgroup) namespace of this VM's own, arranged as ``view`` says."""
    cgroups = view.get("cgroups") or {}
    _unshare(CLONE_NEWNS | (CLONE_NEWCGROUP if cgroups else 0))
    # Nothing done from here on propagates back to this machine's mounts.
    _mount(None, "/", None, MS_REC | MS_PRIVATE)

    keep = view.get("keep", [])
    mask = view.get("mask", [])
    # Open what must stay reachable before anything covers its path.
    keep_fds = [os.open(path, os.O_PATH) for path, _ in keep]
    mask_fds = [os.open(source, os.O_PATH) for _, source in mask]

    for path in view.get("tmpfs", []):
        _mount("tmpfs", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    pending = list(view.get("hide", []))
    hidden: list[str] = []

    def hide(paths: list[str]) -> None:
        for path in paths:
            # A path under a directory hidden (or made private) just now is gone already.
            if os.path.isdir(path):
                _mount("hidden", path, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
                hidden.append(path)
                pending.remove(path)

    hide(list(pending))
    for (path, readonly), fd in zip(keep, keep_fds, strict=True):
        _mount_point(path, fd)
        _bind(fd, path, readonly)
    # One inside a directory bound back (site-packages in the base interpreter's prefix)
    # is hidden now; the others stay as they are (the mount points of what was kept).
    hide([path for path in pending if _under(path, [path for path, _ in keep])])
    for path in hidden:
        _readonly(path)
    for (target, _), fd in zip(mask, mask_fds, strict=True):
        _bind(fd, target, readonly=True)
    if cgroups:
        _mount_cgroups(cgroups)


def _under(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _mount_point(path: str, fd: int) -> None:
    """A directory (or an empty file, for a file) at ``path`` to bind ``fd`` on."""
    if stat.S_ISDIR(os.fstat(fd).st_mode):
        os.makedirs(path, exist_ok=True)
    elif not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "x"):
            pass


def _mount_cgroups(directories: dict[str, str]) -> None:
    """The VM's own cgroups where Dask reads its limits; in its cgroup namespace they are root."""
    root = "/sys/fs/cgroup"
    _mount("cgroup-view", root, "tmpfs", MS_NOSUID | MS_NODEV, "mode=755,size=1m")
    for controller, name in directories.items():
        os.mkdir(f"{root}/{name}")
        _mount("cgroup", f"{root}/{name}", "cgroup", MS_NOSUID | MS_NODEV, controller)
        # As systemd lays it out ("cpu" links to "cpu,cpuacct"), where dask reads it.
        if controller != name:
            os.symlink(name, f"{root}/{controller}")
    _readonly(root)


def wait_for_gate() -> bool:
    """Whether the owner opened the gate, stdin (False: it closed the pipe first: it died)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(0, 64)
        if not chunk:
            return False
        data += chunk
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    return True


def launch(spec: Spec) -> None:
    """Wait for the owner, enter the view, become the boot script (does not return)."""
    if not wait_for_gate():
        sys.exit(1)
    if spec["view"] is not None:
        try:
            enter_view(spec["view"])
        except OSError as error:
            print(f"[local cloud] could not set up this VM's own view: {error}", flush=True)
            sys.exit(1)
    os.chdir(spec["cwd"])
    os.execv(spec["argv"][0], spec["argv"])


def probe() -> None:
    """Exit 0 if a VM can have a view of its own here; else print why and exit 1.

    Run it in a process of its own (``--probe``): it leaves that process in a new namespace.
    """
    try:
        _unshare(CLONE_NEWNS | CLONE_NEWCGROUP)
        _mount(None, "/", None, MS_REC | MS_PRIVATE)
        _mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    except OSError as error:
        print(error, flush=True)
        sys.exit(1)
    sys.exit(0)


def main(argv: list[str]) -> None:
    if argv == ["--probe"]:
        probe()
    launch(marshal.loads(bytes.fromhex(argv[0])))


if __name__ == "__main__":
    main(sys.argv[1:])
