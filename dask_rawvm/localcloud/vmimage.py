"""What a local VM's machine image gives it: the ``warm`` image and the ``bare`` one.

A local VM is a process group on this machine; its image decides what that process sees.

``warm`` (the default, for fast tests)
    This machine as the client sees it: ``PATH`` starts with the client's environment
    (Python with Dask, uv), the machine's uv cache is shared, and environments are
    installed once per machine into a shared directory (``RAWVM_HOME``), so a VM boots in
    well under a second and installs nothing twice. The boot path of a real VM never runs.

``bare`` (what a fresh Amazon Linux 2023 VM has)
    A system ``python3``: this machine's base interpreter (``sys.base_prefix``) through a
    virtualenv made without pip, so only the standard library is importable; the machine's
    tools (curl, bash, coreutils, tar, gzip, awk, sed, grep, flock, setsid...) on ``PATH``
    but no Python tooling (no uv, no pip, no client virtualenv); its own ``HOME`` and
    ``RAWVM_HOME`` and so an empty uv cache. Where mount namespaces work (as root), each VM
    also gets a filesystem view of its own (:mod:`.vmlaunch`): a private ``/tmp`` and
    ``/dev/shm``; the client's working directory, home, virtualenv and caches, the cloud's
    working directory (other VMs' files), and the base interpreter's site-packages covered
    by empty directories; ``/usr/bin/pip*`` and other Python tooling masked, and
    ``/usr/bin/python3`` the image's ``python3``. Elsewhere the isolation is ``PATH`` and
    environment only (absolute paths still reach this machine's files), and
    :attr:`Image.isolation` says so.

Both pass this machine's trust store and proxy variables through
(:data:`HOST_NETWORK_VARIABLES`): a real image has its own trust store. Both are sized like
their instance type when the machine allows it (:mod:`.sizing`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import platform
import pwd
import re
import shutil
import site
import subprocess
import sys
import tempfile
import venv
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from dask_rawvm.localcloud import vmlaunch

if TYPE_CHECKING:
    from dask_rawvm.localcloud.vmlaunch import View

ImageName = Literal["warm", "bare"]

#: The images a LocalCloud can boot its VMs from.
IMAGES: tuple[ImageName, ...] = ("warm", "bare")

# A local VM runs on this machine's network, so it keeps this machine's view of it:
# the trust store and the proxies (a real VM image would carry its own). Nothing
# else of the user's environment reaches a VM.
HOST_NETWORK_VARIABLES = (
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
)

# Stands in for the VM's `shutdown`/`poweroff`: ends every process of the VM.
_SHUTDOWN_SHIM = (
    "#!/bin/sh\n# local cloud: powering off this VM ends its process group\nkill -TERM 0\n"
)
_SHUTDOWN_COMMANDS = ("shutdown", "poweroff", "halt", "reboot")

#: Where the bare image finds its tools: Amazon Linux's root ``PATH``, in its order.
SYSTEM_PATH = ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")

# Python and its tooling: none of it is on a fresh image, except its own python3.
_PYTHON = re.compile(r"python3(\.\d+)?")
_PYTHON_TOOLING = re.compile(
    r".*python.*|pip.*|pydoc.*|py3.*|pygettext.*|idle.*|2to3.*|easy_install.*|uvx?|pipx|"
    r".*virtualenv.*|conda|mamba|micromamba|pyenv|poetry|pdm|hatch|rye|tox|nox"
)

# Directories a view never hides: the system itself (and so any of their ancestors).
_SYSTEM_DIRECTORIES = (
    "/usr", "/bin", "/sbin", "/lib", "/lib64", "/etc", "/dev", "/proc", "/sys", "/run", "/var",
)  # fmt: skip
# The view's private, empty, writable directories (Amazon Linux mounts a tmpfs on /tmp).
_PRIVATE_DIRECTORIES = ("/tmp", "/dev/shm")


@dataclass(frozen=True)
class Isolation:
    """What keeps a local VM apart from this machine and from the other VMs.

    Attributes
    ----------
    own_view
        Each VM has a filesystem view of its own (a mount namespace): the client's working
        directory, home and virtualenv are not visible, ``/tmp`` is its own.
    sized
        Each VM has its instance type's vCPUs and memory (cgroups), which Dask reads as the
        machine's limits.
    notes
        Why a feature is off, for people.
    """

    own_view: bool
    sized: bool
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Image:
    """What a local cloud's VMs boot with, known before any launch.

    Attributes
    ----------
    name
        ``"warm"`` or ``"bare"`` (see :mod:`dask_rawvm.localcloud.vmimage`).
    python_version
        The version of the image's ``python3`` (``"3.11.7"``).
    has_uv
        Whether uv is on the image (the warm image's; a bare VM must bring it).
    isolation
        What keeps VMs apart.
    """

    name: ImageName
    python_version: str
    has_uv: bool
    isolation: Isolation

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Image:
        isolation = dict(data["isolation"])
        isolation["notes"] = tuple(isolation.get("notes", ()))
        return cls(
            name=data["name"],
            python_version=data["python_version"],
            has_uv=data["has_uv"],
            isolation=Isolation(**isolation),
        )


@functools.cache
def own_view_unavailable() -> str | None:
    """Why VMs cannot have a filesystem view of their own here, or None when they can.

    Probed once per process, in a child (~40 ms): mount and cgroup namespaces, a private
    ``/``, a tmpfs.
    """
    result = subprocess.run(
        [sys.executable, "-I", "-S", vmlaunch.__file__, "--probe"],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode == 0:
        return None
    reason = (result.stdout + result.stderr).strip().splitlines()
    return f"mount namespaces are not available ({reason[-1] if reason else 'unknown'})"


def _write_shims(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name in _SHUTDOWN_COMMANDS:
        shim = directory / name
        shim.write_text(_SHUTDOWN_SHIM)
        shim.chmod(0o755)


class WarmImage:
    """The warm image: this machine as the client sees it (see the module docstring).

    Parameters
    ----------
    directory
        The cloud's directory for image files (the power-off shims).
    image_path
        Directories first on the VMs' ``PATH`` (after the shims).
    uv_cache, environments
        The machine's uv cache and shared environments directory the VMs use.
    """

    name: ImageName = "warm"
    own_view = False

    def __init__(
        self, directory: Path, image_path: list[str], uv_cache: str, environments: Path
    ) -> None:
        self.shims = directory / "shims"
        _write_shims(self.shims)
        self.image_path = image_path
        self.uv_cache = uv_cache
        self.environments = environments

    @property
    def has_uv(self) -> bool:
        return True

    def environment(self, vm_directory: Path) -> dict[str, str]:
        home = vm_directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        path = [
            str(self.shims),
            *self.image_path,
            # This environment (Python with Dask, and uv), then the base interpreter it
            # was made from: uv makes VM venvs from a system Python, as on a real image.
            os.path.dirname(sys.executable),
            os.path.join(sys.base_prefix, "bin"),
            "/usr/local/bin",
            "/usr/bin",
            "/bin",
        ]
        return {
            **_network_variables(),
            "PATH": os.pathsep.join(path),
            "HOME": str(home),
            "TMPDIR": str(home),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            "UV_CACHE_DIR": self.uv_cache,
            # One machine, one disk: VMs of the same environment share its venv (keyed
            # by the bundle's digest; the first installs it, the others wait on a lock).
            "RAWVM_HOME": str(self.environments),
        }

    def view(self, vm_directory: Path) -> View | None:
        """The VM's view (:mod:`.vmlaunch`): none, the warm VM sees this machine."""
        return None


class BareImage:
    """The bare image: what a fresh Amazon Linux 2023 VM has (see the module docstring).

    Parameters
    ----------
    directory
        The cloud's directory for image files (the power-off shims).
    cache
        Where this machine keeps the image's root (:func:`bare_root`).
    image_path
        Directories first on the VMs' ``PATH`` (after the shims).
    own_view
        Give each VM a filesystem view of its own (needs mount namespaces).
    hide
        Directories the view covers besides the client's (the cloud's working directory).
    """

    name: ImageName = "bare"

    def __init__(
        self,
        directory: Path,
        cache: Path,
        image_path: list[str],
        own_view: bool,
        hide: list[Path],
    ) -> None:
        self.shims = directory / "shims"
        _write_shims(self.shims)
        self.root = bare_root(cache)
        self.image_path = image_path
        self.own_view = own_view
        self._view = _bare_view(self, hide) if own_view else None

    @property
    def has_uv(self) -> bool:
        return False

    @property
    def bin(self) -> Path:
        return self.root / "bin"

    @property
    def python(self) -> Path:
        """The image's ``python3``."""
        return self.bin / "python3"

    def environment(self, vm_directory: Path) -> dict[str, str]:
        home = vm_directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        variables = {
            **_network_variables(),
            "PATH": os.pathsep.join([str(self.shims), *self.image_path, str(self.bin)]),
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "PYTHONUNBUFFERED": "1",
            # Its own, as on a VM's disk; uv's cache defaults to $HOME/.cache/uv: empty.
            "RAWVM_HOME": str(vm_directory / "dask-rawvm"),
        }
        if self._view is None:  # no private /tmp: the VM's temporary files stay its own
            tmp = vm_directory / "tmp"
            tmp.mkdir(exist_ok=True)
            variables["TMPDIR"] = str(tmp)
        return variables

    def view(self, vm_directory: Path) -> View | None:
        """The VM's view (:mod:`.vmlaunch`), or None without one."""
        if self._view is None:
            return None
        own = (os.path.realpath(vm_directory), False)  # the one writable directory kept
        return {**self._view, "keep": [own, *self._view.get("keep", [])]}


class _NoScriptsEnvBuilder(venv.EnvBuilder):
    def setup_scripts(self, context: Any) -> None:  # no activate scripts on an image's PATH
        pass


def _system_tools() -> dict[str, str]:
    """The bare image's tools: this machine's commands but Python tooling, by name."""
    tools: dict[str, str] = {}
    for directory in SYSTEM_PATH:
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                name = entry.name
                if name in tools or _PYTHON_TOOLING.fullmatch(name) or name in _SHUTDOWN_COMMANDS:
                    continue
                if entry.is_file() and os.access(entry.path, os.X_OK):
                    tools[name] = entry.path
    return tools


def bare_root(cache: Path) -> Path:
    """The bare image's root, built once per interpreter and set of tools under ``cache``.

    A virtualenv of the base interpreter without pip (so ``python3`` imports the standard
    library only), whose ``bin`` also links to this machine's tools. Building it makes
    ~1200 symlinks, which takes ~1 s on this machine's disk (measured), so every cloud of
    this machine shares one: read-only in a VM's own view, and checked at each cloud start
    (a VM without a view could have installed pip into it: then it is built again).
    """
    tools = _system_tools()
    version = python_version()
    base = os.path.realpath(getattr(sys, "_base_executable", sys.executable))
    key = hashlib.sha256(repr((base, version, sorted(tools.items()))).encode()).hexdigest()
    root = cache / f"bare-python{version}-{key[:16]}"
    pythons = {"python3", f"python3.{sys.version_info.minor}"}
    if _intact(root, set(tools) | pythons):
        return root
    cache.mkdir(parents=True, exist_ok=True)
    if root.exists():  # changed since it was built: set it aside, build it again
        stale = Path(tempfile.mkdtemp(prefix=".stale-", dir=cache))
        with contextlib.suppress(OSError):
            root.rename(stale / root.name)
        shutil.rmtree(stale, ignore_errors=True)
    building = Path(tempfile.mkdtemp(prefix=".building-", dir=cache))
    try:
        # In-process, from this (possibly virtual) environment: EnvBuilder links the new
        # venv to the base interpreter (sys._base_executable), not to this environment.
        _NoScriptsEnvBuilder(symlinks=True, with_pip=False, clear=True).create(building)
        for python in (building / "bin").iterdir():
            if python.name not in pythons:  # Amazon Linux has python3 and python3.X only
                python.unlink()
        for name, path in tools.items():
            (building / "bin" / name).symlink_to(path)
        # Masks /usr/bin/python3 in a VM's view: a file, as a bind mount follows symlinks.
        wrapper = building / "python3"
        wrapper.write_text(f'#!/bin/sh\nexec {root / "bin" / "python3"} "$@"\n')
        wrapper.chmod(0o755)
        building.rename(root)
    except OSError:
        if not _intact(root, set(tools) | pythons):  # not another process's, just made
            raise
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return root


def _intact(root: Path, commands: set[str]) -> bool:
    """Whether ``root`` is a bare image with exactly ``commands`` and no packages."""
    try:
        site_packages = list((root / "lib").glob("python3*/site-packages/*"))
        return not site_packages and set(os.listdir(root / "bin")) == commands
    except OSError:
        return False


def _network_variables() -> dict[str, str]:
    return {k: os.environ[k] for k in HOST_NETWORK_VARIABLES if k in os.environ}


def _client_directories() -> list[str]:
    """What a bare VM must not see of the client: its directories, environment and caches."""
    candidates = [
        os.getcwd(),
        os.path.expanduser("~"),
        pwd.getpwuid(os.getuid()).pw_dir,
        sys.prefix,
        sys.exec_prefix,
        *(
            os.environ.get(v, "")
            for v in ("UV_CACHE_DIR", "XDG_CACHE_HOME", "DASK_RAWVM_CACHE_DIR")
        ),
    ]
    return [c for c in candidates if c]


def _is_protected(path: str) -> bool:
    """``/`` and the system's directories (or their ancestors) are never hidden."""
    return path == "/" or any(
        d == path or d.startswith(path.rstrip("/") + "/") for d in _SYSTEM_DIRECTORIES
    )


def _under(path: str, roots: list[str]) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _bare_view(image: BareImage, hide: list[Path]) -> View:
    """The mount plan of a bare VM's view, but for the VM's own directory (see ``view``)."""
    base = sorted({os.path.realpath(p) for p in (sys.base_prefix, sys.base_exec_prefix)})
    base_site = [os.path.realpath(p) for p in site.getsitepackages(base)]
    hidden = []
    for path in sorted({os.path.realpath(p) for p in [*_client_directories(), *map(str, hide)]}):
        # Never the base interpreter's own prefix: hiding its parent (the home of a
        # pyenv Python) is fine, since the prefix is bound back.
        # Nor a directory the view replaces by an empty private one anyway (a client working
        # in /tmp): hiding it read-only would take the VM's /tmp away.
        private = _under(path, list(_PRIVATE_DIRECTORIES))
        if os.path.isdir(path) and not (_is_protected(path) or _under(path, base) or private):
            hidden.append(path)
    hidden = [p for p in hidden if not _under(os.path.dirname(p), hidden)]
    covered = [*_PRIVATE_DIRECTORIES, *hidden]
    # The base interpreter's own packages (pip among them) are not importable through the
    # image's venv; covering them also keeps `--system-site-packages` venvs honest.
    hidden += [p for p in base_site if os.path.isdir(p)]

    trust = ("SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")
    keep_readonly = [
        *base,
        str(image.root),
        str(image.shims),
        *image.image_path,
        *(os.environ[v] for v in trust if v in os.environ),
    ]
    keep: list[str] = []
    for path in sorted({os.path.realpath(p) for p in keep_readonly if os.path.exists(p)}):
        if _under(path, covered) and not _under(path, keep):
            keep.append(path)

    mask = []
    for target in sorted(_tooling_files()):
        # A Python a script names by path (#!/usr/bin/python3) is the image's python3.
        source = str(image.root / "python3") if _PYTHON.fullmatch(target.name) else os.devnull
        mask.append((str(target), source))
    return {
        "tmpfs": list(_PRIVATE_DIRECTORIES),
        "hide": hidden,
        "keep": [(p, True) for p in keep],
        "mask": mask,
    }


def _tooling_files() -> set[Path]:
    """The files of Python tooling in the system's directories (their real paths).

    A name is masked through its real path only when that is Python tooling too: a
    ``python3`` linking to ``python3.11`` is, a ``shutdown`` linking to ``systemctl`` is not.
    """
    files = set()
    for directory in SYSTEM_PATH:
        with contextlib.suppress(OSError):
            for entry in os.scandir(directory):
                if not _PYTHON_TOOLING.fullmatch(entry.name):
                    continue
                real = Path(os.path.realpath(entry.path))
                if real.is_file() and _PYTHON_TOOLING.fullmatch(real.name):
                    files.add(real)
    return files


def python_version() -> str:
    """The version of the interpreter both images' ``python3`` run (``"3.11.7"``)."""
    return platform.python_version()
