"""conda packages on the VMs: solved for the target with py-rattler, shipped, installed there.

A conda environment holds packages that PyPI has no counterpart for: C libraries and
command-line tools (``ffmpeg``, ``gdal``, ``samtools``). Those are installed on every VM from
the user's channels, for the VM's platform, next to the Python venv:

1. Client side, :func:`lock_conda`: the packages to ship (:class:`CondaPackage`, read from
   ``<prefix>/conda-meta`` by :func:`read_prefix_packages` or from a ``conda-lock.yml`` by
   :func:`read_conda_lock_packages`) are solved for the target's conda platform (``linux-64``,
   ``linux-aarch64``) with its virtual packages (``__glibc``, ``__cuda``, ...). On the source's
   platform each package keeps its exact version and build; on another platform its exact
   version, any build. Dependencies come out of the solve. The result, a :class:`CondaLock`,
   is cached by the content hash of those inputs: a second call with equal inputs runs no
   solver (``CondaLock.from_cache``).
2. Bundle, :meth:`CondaLock.write_into`: ``conda/`` in the environment bundle: the lock the
   VM reads, the installer it runs, and the package files of local (``file://``) channels,
   which a VM cannot read; packages of http(s) channels are downloaded by the VM.
3. VM, :func:`conda_install_script`: a shell snippet that installs the lock into
   ``$RAWVM_VENV/conda`` with py-rattler (same version as here) from a small tool venv, and
   :func:`conda_runtime_exports`, what the Dask process's shell sets afterwards.

py-rattler is imported only where a solve happens (its import costs ~75 ms, measured): an
environment without conda packages never loads it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import asdict, dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import unquote, urlparse

from dask_rawvm.environment.lock import default_cache_dir
from dask_rawvm.environment.spec import EnvironmentSpec, PackagePin
from dask_rawvm.environment.target import Target
from dask_rawvm.environment.translate import EnvironmentTranslationError, Problem

if TYPE_CHECKING:
    from rattler import Gateway, RepoDataRecord

_T = TypeVar("_T")

#: Bumped when the stored lock's layout or meaning changes, so old entries are not reused.
CONDA_LOCK_FORMAT = 1
#: Where a channel given by name lives (conda's default ``channel_alias``).
CHANNEL_ALIAS = "https://conda.anaconda.org"
#: conda's ``defaults`` multichannel on Linux.
DEFAULTS_CHANNELS = ("https://repo.anaconda.com/pkgs/main", "https://repo.anaconda.com/pkgs/r")
#: VM architecture -> conda platform (subdir).
SUBDIRS: dict[str, str] = {"x86_64": "linux-64", "aarch64": "linux-aarch64"}
#: ``__linux`` of the VMs: the kernel of Amazon Linux 2023 (6.1). conda packages state only
#: a floor (conda-forge: ``__linux >=3.10``), so the exact value matters little.
VM_LINUX_KERNEL = "6.1"
#: The bundle's subdirectory for conda (lock, installer, local package files).
BUNDLE_DIR = "conda"
#: Seconds a solve may take before it is stopped, so a pathological one fails before anything
#: launches. (The tests' local channel solves in ~20 ms; conda-forge is not reachable from
#: the machine this was written on, so its solve times are not measured.)
SOLVE_TIMEOUT = 300.0


class CondaEnvironmentError(EnvironmentTranslationError):
    """The conda packages cannot be installed on the target; raised before any VM launches."""


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CondaPackage:
    """A conda package of the source environment, as installed (or locked) there.

    Parameters
    ----------
    name : str
        conda package name.
    version : str
        Exact version.
    build : str
        Build string (``h1a2b3c4_0``); ``""`` when unknown (any build).
    channel : str
        Base URL of the channel it came from (``https://conda.anaconda.org/conda-forge``,
        ``file:///srv/channel``); ``""`` when unknown.
    subdir : str
        Platform it was built for (``linux-64``, ``noarch``); ``""`` when unknown.
    """

    name: str
    version: str
    build: str = ""
    channel: str = ""
    subdir: str = ""

    def match_spec(self, subdir: str) -> str:
        """The solver's spec for platform ``subdir``: exact version, and the exact build when
        the package was built for that platform (or for any: ``noarch``)."""
        if self.build and self.subdir in (subdir, "noarch"):
            return f"{self.name} =={self.version} {self.build}"
        return f"{self.name} =={self.version}"


@dataclass(frozen=True)
class CondaRecord:
    """One package of a solved conda environment.

    Parameters
    ----------
    name, version, build, subdir : str
    url : str
        Where the package file is: ``https://...`` (the VM downloads it) or ``file://...``
        (a local channel: the file travels in the bundle).
    sha256 : str
        Hex digest of the package file.
    file_name : str
        ``<name>-<version>-<build>.conda`` or ``.tar.bz2``.
    channel : str
        Base URL of its channel.
    size : int, optional
        Package file size in bytes, when the channel states it.
    """

    name: str
    version: str
    build: str
    subdir: str
    url: str
    sha256: str
    file_name: str
    channel: str
    size: int | None = None

    @property
    def local(self) -> bool:
        """True for a package of a ``file://`` channel (shipped in the bundle)."""
        return self.url.startswith("file:")

    def as_dict(self) -> dict[str, object]:
        """JSON-ready form."""
        return asdict(self)


@dataclass(frozen=True)
class CondaLock:
    """The conda packages of one target, solved, with everything the VM needs to install them.

    Parameters
    ----------
    target : Target
    subdir : str
        conda platform of the target (``linux-64``, ``linux-aarch64``).
    records : tuple of CondaRecord
        Every package to install, dependencies included, sorted by name.
    requested : tuple of str
        The specs solved for (one per shipped package).
    channels : tuple of str
        Channel base URLs, highest priority first.
    virtual_packages : tuple of str
        ``name=version=build`` of the target's virtual packages.
    key : str
        sha256 of the inputs; the cache entry's name.
    path : Path
        The stored lock file (rattler lock format), read by the VM's installer.
    from_cache : bool
        True when read from the cache: no solver ran.
    rattler_version : str
        py-rattler version that solved and wrote the lock; the VM installs with the same.
    """

    target: Target
    subdir: str
    records: tuple[CondaRecord, ...]
    requested: tuple[str, ...]
    channels: tuple[str, ...]
    virtual_packages: tuple[str, ...]
    key: str
    path: Path
    from_cache: bool
    rattler_version: str

    def versions(self) -> dict[str, str]:
        """conda name -> locked version, dependencies included."""
        return {r.name: r.version for r in self.records}

    def write_into(self, bundle_dir: str | os.PathLike[str]) -> list[Path]:
        """Write ``conda/`` into an environment bundle directory.

        Layout (nothing is written when the lock holds no package)::

            conda/lock.yaml          the lock (rattler lock format, one platform)
            conda/install.py         the installer the VM runs (stdlib + py-rattler)
            conda/rattler-version    the py-rattler version the VM installs to run it
            conda/pkgs/<file>        package files of local (file://) channels

        Equal locks give equal bytes (the bundle is content-addressed).

        Parameters
        ----------
        bundle_dir : path-like
            The bundle directory being assembled.

        Returns
        -------
        list of Path
            The files written, sorted.

        Raises
        ------
        CondaEnvironmentError
            A local package file is gone or changed since the lock was made.
        """
        if not self.records:
            return []
        out = Path(bundle_dir) / BUNDLE_DIR
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "lock.yaml", out / "install.py", out / "rattler-version"]
        shutil.copyfile(self.path, written[0])
        written[1].write_bytes(installer_source())
        written[2].write_text(self.rattler_version + "\n", encoding="utf-8")
        problems = []
        for record in self.records:
            if not record.local:
                continue
            source = _url_path(record.url)
            if not source.is_file() or _sha256(source) != record.sha256:
                problems.append(
                    Problem(
                        record.name,
                        f"the package file {source} of the local channel {record.channel} is "
                        "missing or changed since the conda packages were locked",
                        "restore the channel, or lock again (refresh=True)",
                    )
                )
                continue
            destination = out / "pkgs" / record.file_name
            destination.parent.mkdir(exist_ok=True)
            shutil.copyfile(source, destination)
            written.append(destination)
        if problems:
            raise CondaEnvironmentError(problems, self.target)
        return sorted(written)


# --------------------------------------------------------------------------------------------
# Reading the source environment
# --------------------------------------------------------------------------------------------


def read_prefix_packages(prefix: str | os.PathLike[str]) -> dict[str, CondaPackage]:
    """The conda packages installed in a prefix, from ``<prefix>/conda-meta/*.json``.

    Parameters
    ----------
    prefix : path-like
        A conda environment's prefix.

    Returns
    -------
    dict of str to CondaPackage
        By conda name; empty when the prefix is not a conda environment.
    """
    meta = Path(prefix) / "conda-meta"
    packages: dict[str, CondaPackage] = {}
    for file in sorted(meta.glob("*.json")) if meta.is_dir() else []:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if not isinstance(data, dict) or "name" not in data:
            continue
        url = str(data.get("url") or "")
        subdir = str(data.get("subdir") or _url_subdir(url))
        channel = _channel_of(url, str(data.get("channel") or ""), subdir)
        name = str(data["name"])
        packages[name] = CondaPackage(
            name, str(data.get("version", "")), str(data.get("build", "")), channel, subdir
        )
    return packages


def read_conda_lock_packages(
    path: str | os.PathLike[str], platform: str | None = None
) -> dict[str, CondaPackage]:
    """The conda packages of a ``conda-lock.yml`` (version 1) for one platform.

    Parameters
    ----------
    path : path-like
        The lock file.
    platform : str, optional
        conda platform whose entries are read (default: ``linux-64`` if locked, else the first),
        as :func:`~dask_rawvm.environment.inventory.parse_conda_lock` chooses.

    Returns
    -------
    dict of str to CondaPackage
        By conda name (pip entries left out); the build comes from the file name in the URL.
    """
    import yaml

    data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    entries = [e for e in data.get("package") or [] if isinstance(e, dict)]
    platforms = list(dict.fromkeys(str(e.get("platform")) for e in entries))
    if not platforms:
        return {}
    chosen = platform or ("linux-64" if "linux-64" in platforms else platforms[0])
    packages: dict[str, CondaPackage] = {}
    for entry in entries:
        if entry.get("platform") != chosen or entry.get("manager", "conda") != "conda":
            continue
        url = str(entry.get("url") or "")
        name, version = str(entry["name"]), str(entry["version"])
        packages[name] = CondaPackage(
            name, version, _build_of(url, name, version), _channel_of(url, "", ""), _url_subdir(url)
        )
    return packages


def conda_only_pins(pins: Iterable[PackagePin], ignore: Iterable[str] = ()) -> list[PackagePin]:
    """The pins this module installs: conda packages without Python code, not ignored.

    (conda packages with Python code are installed from PyPI at the same version, by the
    translation; these have no PyPI counterpart.)
    """
    ignored = set(ignore)
    return [
        p
        for p in pins
        if p.source == "conda"
        and not p.python
        and p.name not in ignored
        and (p.conda_name or p.name) not in ignored
    ]


def _url_subdir(url: str) -> str:
    parts = url.rstrip("/").rsplit("/", 2)
    return parts[1] if len(parts) == 3 else ""


def _channel_of(url: str, channel: str, subdir: str) -> str:
    """The channel's base URL, from a package URL (``<channel>/<subdir>/<file>``) or from
    conda-meta's ``channel`` (which conda writes with the subdir, rattler without)."""
    if url:
        return url.rsplit("/", 2)[0]
    channel = channel.rstrip("/")
    if subdir and channel.endswith("/" + subdir):
        channel = channel[: -len(subdir) - 1]
    return channel_url(channel)[0] if channel else ""


def _build_of(url: str, name: str, version: str) -> str:
    file_name = url.rsplit("/", 1)[-1]
    stem = file_name.removesuffix(".conda").removesuffix(".tar.bz2")
    prefix = f"{name}-{version}-"
    return stem[len(prefix) :] if stem.startswith(prefix) else ""


# --------------------------------------------------------------------------------------------
# Target
# --------------------------------------------------------------------------------------------


def conda_subdir(target: Target) -> str:
    """The conda platform of a target: ``linux-64`` or ``linux-aarch64``."""
    return SUBDIRS[target.arch]


def virtual_packages(target: Target) -> tuple[str, ...]:
    """The target's virtual packages, as ``name=version=build``.

    ``__unix``, ``__linux`` (:data:`VM_LINUX_KERNEL`), ``__glibc`` (the image's), ``__archspec``
    (the architecture's baseline, so no micro-architecture-specific build is chosen), and for
    a CUDA target ``__cuda`` at its major version (conda-forge's CUDA 12 packages ask for
    ``__cuda >=12``: the driver of a CUDA-12 image runs any 12.x, by CUDA's minor version
    compatibility).
    """
    found = [
        "__archspec=1=" + target.arch,
        f"__glibc={target.glibc}=0",
        f"__linux={VM_LINUX_KERNEL}=0",
        "__unix=0=0",
    ]
    if target.accelerator == "cuda":
        found.append(f"__cuda={target.cuda_major}=0")
    return tuple(sorted(found))


def channel_url(channel: str) -> list[str]:
    """Base URLs of a channel given by name (``conda-forge``, ``defaults``), URL or path."""
    text = channel.strip().rstrip("/")
    if text == "defaults":
        return list(DEFAULTS_CHANNELS)
    if "://" in text:
        return [text]
    if text.startswith(("/", ".", "~")):
        return [Path(text).expanduser().resolve().as_uri()]
    return [f"{CHANNEL_ALIAS}/{text}"]


def effective_channels(channels: Iterable[str], packages: Iterable[CondaPackage]) -> list[str]:
    """The channels to solve with, highest priority first: the user's, in their order, then
    the packages' own channels that the user did not list (sorted)."""
    ordered: list[str] = []
    for channel in channels:
        ordered += [url for url in channel_url(channel) if url not in ordered]
    extra = sorted({p.channel.rstrip("/") for p in packages if p.channel} - set(ordered))
    return ordered + extra


# --------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------


def lock_conda_for(
    spec: EnvironmentSpec, target: Target, cache_dir: str | os.PathLike[str] | None = None
) -> CondaLock | None:
    """The conda lock of an environment's conda-only packages for ``target`` (None: none).

    Their exact builds and channels come from where the spec came from: the running
    environment's ``conda-meta``, or the ``conda-lock.yml`` it was read from.
    """
    pins = conda_only_pins(spec.packages, spec.ignore)
    if not pins:
        return None
    if spec.origin == "local":
        have = read_prefix_packages(sys.prefix)
    else:
        have = read_conda_lock_packages(spec.origin)
    missing = [p.conda_name or p.name for p in pins if (p.conda_name or p.name) not in have]
    if missing:
        raise CondaEnvironmentError(
            [
                Problem(name, f"no conda record of {name} in {spec.origin}", "reinstall it")
                for name in missing
            ],
            target,
        )
    packages = [have[p.conda_name or p.name] for p in pins]
    return lock_conda(packages, target, channels=spec.conda_channels, cache_dir=cache_dir)


def lock_conda(
    packages: Sequence[CondaPackage],
    target: Target,
    *,
    channels: Sequence[str] = (),
    cache_dir: str | os.PathLike[str] | None = None,
    refresh: bool = False,
    timeout: float = SOLVE_TIMEOUT,
) -> CondaLock:
    """Solve the conda packages for the target, or read the solution from the cache.

    Parameters
    ----------
    packages : sequence of CondaPackage
        What to ship (see :func:`read_prefix_packages`, :func:`conda_only_pins`).
    target : Target
        The VMs' platform: its architecture picks the conda platform, its glibc and CUDA the
        virtual packages (:func:`virtual_packages`).
    channels : sequence of str
        The user's channels (names, URLs or paths), highest priority first. The packages'
        own channels are added after them (:func:`effective_channels`).
    cache_dir : path-like, optional
        Cache root (see :func:`~dask_rawvm.environment.lock.default_cache_dir`); locks live
        in ``<root>/conda/locks``, channel metadata in ``<root>/conda/repodata``.
    refresh : bool
        Solve again even if a cached lock exists.
    timeout : float
        Seconds the solver may take.

    Returns
    -------
    CondaLock

    Raises
    ------
    CondaEnvironmentError
        A package is not in the channels for the target's platform (the error names it, the
        platform, and the fix), the packages conflict there, or a channel cannot be read.
    """
    subdir = conda_subdir(target)
    unique = {p.name: p for p in packages}
    requested = tuple(unique[name].match_spec(subdir) for name in sorted(unique))
    channel_urls = tuple(effective_channels(channels, unique.values()))
    virtual = virtual_packages(target)
    rattler_version = metadata.version("py-rattler")
    key = conda_lock_key(requested, channel_urls, subdir, virtual, rattler_version)
    root = default_cache_dir(cache_dir) / "conda"
    store = root / "locks"
    if not refresh:
        cached = _read_cached(store / key, target)
        if cached is not None:
            return cached
    records = _solve(requested, channel_urls, subdir, virtual, target, root / "repodata", timeout)
    return _store(
        store, key, target, subdir, records, requested, channel_urls, virtual, rattler_version
    )


def conda_lock_key(
    requested: Sequence[str],
    channels: Sequence[str],
    subdir: str,
    virtual: Sequence[str],
    rattler_version: str,
) -> str:
    """sha256 over everything that decides the solution. A local channel counts by the
    content of its index (``repodata.json``), so rebuilding it is a new lock; a remote one
    by its URL (like the uv locks: a cached lock stays as solved until ``refresh=True``)."""
    inputs = {
        "format": CONDA_LOCK_FORMAT,
        "rattler": rattler_version,
        "subdir": subdir,
        "virtual": list(virtual),
        "requested": list(requested),
        "channels": [[url, _local_index_digest(url, subdir)] for url in channels],
    }
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _local_index_digest(url: str, subdir: str) -> str | None:
    if not url.startswith("file:"):
        return None
    digest = hashlib.sha256()
    for platform in (subdir, "noarch"):
        index = _url_path(url) / platform / "repodata.json"
        digest.update(platform.encode() + b"\0")
        if index.is_file():
            digest.update(_sha256(index).encode())
    return digest.hexdigest()


def _solve(
    requested: Sequence[str],
    channels: Sequence[str],
    subdir: str,
    virtual: Sequence[str],
    target: Target,
    repodata_cache: Path,
    timeout: float,
) -> list[RepoDataRecord]:
    # Imported here, not at the top: py-rattler costs ~75 ms to import (measured) and only
    # environments with conda packages need it.
    import rattler
    from rattler.exceptions import FetchRepoDataError, GatewayError, SolverError

    if not requested:
        return []
    if not channels:
        names = [spec.split()[0] for spec in requested]
        problem = Problem(
            "(conda channels)",
            f"no conda channel is known for {', '.join(names)} (their records name none)",
            f"name the channels they come from, or environment_ignore={names!r}",
        )
        raise CondaEnvironmentError([problem], target)
    gateway = rattler.Gateway(cache_dir=repodata_cache)
    solve = rattler.solve(
        list(channels),
        list(requested),
        gateway=gateway,
        platforms=[rattler.Subdir(subdir), rattler.Subdir("noarch")],
        virtual_packages=[_generic_virtual(v) for v in virtual],
        timeout=datetime.timedelta(seconds=timeout),
    )
    try:
        return _run(solve)
    except SolverError as exc:
        problems = _diagnose(gateway, requested, channels, subdir, target) or [
            Problem(
                "(conda packages)",
                f"{', '.join(requested)} have no solution for {subdir} in {', '.join(channels)}:"
                f" {str(exc).strip()}",
                "environment_ignore=[...] the package the solver names, add the channel that "
                "has its dependencies, or use instance types of the source's platform",
            )
        ]
        raise CondaEnvironmentError(problems, target) from None
    except (FetchRepoDataError, GatewayError) as exc:
        problem = Problem(
            "(conda channels)",
            f"the channels {', '.join(channels)} cannot be read for {subdir}: {exc}",
            "check the channel URLs and this machine's network, or environment_ignore=[...] "
            "the conda packages",
        )
        raise CondaEnvironmentError([problem], target) from None


def _diagnose(
    gateway: Gateway,
    requested: Sequence[str],
    channels: Sequence[str],
    subdir: str,
    target: Target,
) -> list[Problem]:
    """One problem per requested package that the channels lack for ``subdir``."""
    from rattler import MatchSpec, Subdir

    specs = [MatchSpec(spec) for spec in requested]
    platforms = [Subdir(s) for s in dict.fromkeys([subdir, "noarch", *SUBDIRS.values()])]
    names = [spec.split()[0] for spec in requested]
    found = _run(gateway.query(list(channels), platforms, names, recursive=False))
    available = [record for per_channel in found for record in per_channel]
    problems = []
    for text, spec, name in zip(requested, specs, names, strict=True):
        candidates = [r for r in available if r.name.normalized == name]
        if any(r.subdir in (subdir, "noarch") and r.matches(spec) for r in candidates):
            continue
        _, version, *build = text.split()
        version = version.removeprefix("==")
        same = [r for r in candidates if str(r.version) == version]
        here = sorted({str(r.build) for r in same if r.subdir in (subdir, "noarch")})
        elsewhere = sorted({r.subdir for r in same} - {subdir, "noarch"})
        listed = f"the channels {', '.join(channels)}"
        ignore = f"environment_ignore=[{name!r}] if the workers do not need it"
        if build and here:
            # The source's own build is gone (or never was there): other builds of the version
            # exist, but only the source's build is known to be what the source runs.
            reason = (
                f"conda package {name} {version} build {build[0]} is not in {listed} for "
                f"{subdir}; builds of {version} there: {', '.join(here)}"
            )
            fix = f"install one of those builds here (conda install '{name}={version}=<build>')"
            fix += f", or {ignore}"
        elif elsewhere:
            arm = "arm=False" if target.arch == "aarch64" else "arm=True"
            reason = (
                f"conda package {name} {version} is not in {listed} for {subdir}, the VMs' "
                f"platform (they have it for {', '.join(elsewhere)} only)"
            )
            fix = f"{ignore}, or instance types of another architecture ({arm})"
        else:
            reason = f"conda package {name} {version} is not in {listed} for {subdir}"
            fix = f"{ignore}, or add a channel that has it"
        problems.append(Problem(name, reason, fix))
    return problems


def _generic_virtual(text: str) -> Any:
    from rattler import BuildString, GenericVirtualPackage, PackageName, Version

    name, version, build = text.split("=")
    return GenericVirtualPackage(PackageName(name), Version(version), BuildString(build))


def _run(coroutine: Coroutine[Any, Any, _T]) -> _T:
    """Run a py-rattler coroutine to completion from synchronous code, also when the caller
    is inside an event loop (the cluster's start): then on a thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="rawvm-conda") as pool:
        return pool.submit(asyncio.run, coroutine).result()


# --------------------------------------------------------------------------------------------
# The cache
# --------------------------------------------------------------------------------------------


def _store(
    store: Path,
    key: str,
    target: Target,
    subdir: str,
    solved: Sequence[RepoDataRecord],
    requested: Sequence[str],
    channels: Sequence[str],
    virtual: Sequence[str],
    rattler_version: str,
) -> CondaLock:
    from rattler import LockChannel, LockFile, LockPlatform

    store.mkdir(parents=True, exist_ok=True)
    ordered = sorted(solved, key=lambda r: r.name.normalized)
    staging = Path(tempfile.mkdtemp(prefix=".solve-", dir=store))
    try:
        lock_file = LockFile([LockPlatform(subdir, virtual_packages=list(virtual))])
        lock_file.set_channels("default", [LockChannel(url) for url in channels])
        for record in ordered:
            lock_file.add_conda_package("default", LockPlatform(subdir), record)
        lock_file.to_path(staging / "lock.yaml")
        records = tuple(_record(r) for r in ordered)
        summary = {
            "format": CONDA_LOCK_FORMAT,
            "key": key,
            "subdir": subdir,
            "target": target.as_dict(),
            "requested": list(requested),
            "channels": list(channels),
            "virtual_packages": list(virtual),
            "rattler_version": rattler_version,
            "records": [r.as_dict() for r in records],
        }
        (staging / "records.json").write_text(json.dumps(summary, indent=1, sort_keys=True))
        final = store / key
        try:
            os.replace(staging, final)
        except OSError:
            if not (final / "records.json").is_file():
                raise
            shutil.rmtree(staging)  # solved concurrently: the same inputs, the same lock
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return CondaLock(
        target,
        subdir,
        records,
        tuple(requested),
        tuple(channels),
        tuple(virtual),
        key,
        final / "lock.yaml",
        False,
        rattler_version,
    )


def _record(record: RepoDataRecord) -> CondaRecord:
    return CondaRecord(
        name=record.name.normalized,
        version=str(record.version),
        build=str(record.build),
        subdir=record.subdir,
        url=record.url,
        sha256=record.sha256.hex() if record.sha256 else "",
        file_name=record.file_name,
        channel=(record.channel or "").rstrip("/"),
        size=record.size,
    )


def _read_cached(entry: Path, target: Target) -> CondaLock | None:
    try:
        summary = json.loads((entry / "records.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if summary.get("format") != CONDA_LOCK_FORMAT or not (entry / "lock.yaml").is_file():
        return None
    return CondaLock(
        target,
        summary["subdir"],
        tuple(CondaRecord(**r) for r in summary["records"]),
        tuple(summary["requested"]),
        tuple(summary["channels"]),
        tuple(summary["virtual_packages"]),
        summary["key"],
        entry / "lock.yaml",
        True,
        summary["rattler_version"],
    )


def _url_path(url: str) -> Path:
    return Path(unquote(urlparse(url).path))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# The VM
# --------------------------------------------------------------------------------------------


def installer_source() -> bytes:
    """The VM-side installer (``conda/install.py`` of a bundle): the source of
    :mod:`dask_rawvm.environment.conda_vm_install`, read without importing it."""
    return (resources.files("dask_rawvm.environment") / "conda_vm_install.py").read_bytes()


_INSTALL_SCRIPT = r"""# dask-rawvm: install the bundle's conda packages into $RAWVM_VENV/conda
(
set -eu
: "${RAWVM_BUNDLE:?must name the extracted bundle directory}"
: "${RAWVM_VENV:?must name the environment's virtualenv}"
: "${RAWVM_HOME:?must name the machine's dask-rawvm directory}"
if [ -f "$RAWVM_BUNDLE/conda/lock.yaml" ]; then
  rawvm_rattler_version=$(cat "$RAWVM_BUNDLE/conda/rattler-version")
  rawvm_rattler="$RAWVM_HOME/tools/py-rattler-$rawvm_rattler_version"
  if [ ! -x "$RAWVM_VENV/bin/python" ]; then
    echo "dask-rawvm: conda packages install after the venv: $RAWVM_VENV/bin/python is missing" >&2
    exit 1
  fi
  # One tool venv per machine and py-rattler version, shared by every bundle; Dask processes
  # of one host may install at once, so it is made under a lock and marked complete last.
  mkdir -p "$RAWVM_HOME/tools"
  exec 8>"$rawvm_rattler.lock"
  if command -v flock >/dev/null 2>&1; then flock 8; fi
  if [ ! -f "$rawvm_rattler/.dask-rawvm-complete" ]; then
    rawvm_uv venv --quiet --no-config --allow-existing --python "$RAWVM_VENV/bin/python" \
      "$rawvm_rattler"
    rawvm_uv pip install --quiet --no-config --python "$rawvm_rattler/bin/python" \
      "py-rattler==$rawvm_rattler_version"
    touch "$rawvm_rattler/.dask-rawvm-complete"
  fi
  exec 8>&-
  "$rawvm_rattler/bin/python" "$RAWVM_BUNDLE/conda/install.py" \
    --prefix "$RAWVM_VENV/conda" --cache "$RAWVM_HOME/conda-pkgs"
fi
)
"""

_RUNTIME_EXPORTS = r"""# dask-rawvm: the conda packages, as `conda activate` would make them visible
if [ -d "$RAWVM_VENV/conda/conda-meta" ]; then
    CONDA_PREFIX="$RAWVM_VENV/conda"
    PATH="$RAWVM_VENV/bin:$CONDA_PREFIX/bin:$PATH"
    LD_LIBRARY_PATH="$CONDA_PREFIX/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    export CONDA_PREFIX PATH LD_LIBRARY_PATH
    case $- in *u*) rawvm_nounset=1; set +u ;; *) rawvm_nounset=0 ;; esac
    for rawvm_activate in "$CONDA_PREFIX"/etc/conda/activate.d/*.sh; do
        if [ -f "$rawvm_activate" ]; then . "$rawvm_activate"; fi
    done
    if [ "$rawvm_nounset" = 1 ]; then set -u; fi
fi
"""


def conda_install_script() -> str:
    """The POSIX shell snippet that installs a bundle's conda packages on a VM.

    It needs ``RAWVM_BUNDLE`` (the extracted bundle), ``RAWVM_VENV`` (the environment's
    virtualenv, already created: its Python runs the installer), ``RAWVM_HOME`` (the
    machine's dask-rawvm directory) and a shell function ``rawvm_uv`` that runs uv. It runs
    in a subshell with ``set -eu``; its exit status is the install's. Without ``conda/`` in
    the bundle it does nothing.

    Steps: a tool venv ``$RAWVM_HOME/tools/py-rattler-<version>`` (``rawvm_uv venv`` +
    ``rawvm_uv pip install py-rattler==<version>``, the client's version, from the package
    index), made once per machine; then ``conda/install.py`` links the locked packages into
    ``$RAWVM_VENV/conda``, downloading those of http(s) channels into the shared package
    cache ``$RAWVM_HOME/conda-pkgs`` and taking those of local channels from the bundle.

    Returns
    -------
    str
        Shell text ending with a newline, for embedding in the user-data script after the
        venv install.
    """
    return _INSTALL_SCRIPT


def conda_runtime_exports() -> str:
    """Shell lines that make the installed conda packages visible to the Dask process.

    To run in the boot script's own shell (not a subshell), after the install and before the
    Dask process starts. When ``$RAWVM_VENV/conda`` holds conda packages they set
    ``CONDA_PREFIX``; put ``$RAWVM_VENV/bin`` then ``$RAWVM_VENV/conda/bin`` in front of
    ``PATH`` (the tools run by name, while ``python`` stays the venv's even if a conda
    dependency brought its own); put ``$RAWVM_VENV/conda/lib`` in front of
    ``LD_LIBRARY_PATH`` (for libraries that Python code loads by name, e.g. with
    ``ctypes``); and source the packages' ``etc/conda/activate.d/*.sh`` scripts, which set
    variables such as ``GDAL_DATA`` or ``PROJ_DATA``. Without conda packages they do nothing.

    Returns
    -------
    str
        Shell text ending with a newline.
    """
    return _RUNTIME_EXPORTS
