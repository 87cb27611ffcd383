"""What the user's environment is: installed packages, local code, package indexes.

The result of every entry point here is an :class:`EnvironmentSpec`, whatever the source:
the running environment (``"local"``), a list of requirements, or a lock file the user already
has (``requirements.txt`` from pip-compile or uv, ``uv.lock``, ``conda-lock.yml``).
"""

from __future__ import annotations

import json
import os
import re
import sys
import sysconfig
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal
from urllib.parse import unquote, urlsplit

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

Source = Literal["index", "vcs", "url", "conda"]
LocalKind = Literal["project", "modules", "wheel"]


class EnvironmentSpecError(ValueError):
    """The ``environment=`` argument or a lock file it names cannot be read."""


# --------------------------------------------------------------------------------------------
# Data model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PackagePin:
    """One package of the source environment, fetched from an index or a URL on the VM.

    Parameters
    ----------
    name : str
        Canonical (PEP 503) PyPI name.
    specifier : str
        Version specifier, ``"==1.2.3"`` for pins, ``""`` for "any version".
    source : {"index", "vcs", "url", "conda"}
        Where it came from: a package index, a VCS commit, an archive URL, or a conda package
        that has a PyPI counterpart under ``name``.
    root : bool
        The user asked for it (False: only there as another package's dependency, so it is
        passed to the resolver as a constraint: same version if needed, dropped if not).
    extras, marker, url
        The rest of the PEP 508 requirement.
    conda_name : str, optional
        The conda package name when ``source == "conda"`` (or installed by conda).
    python : bool
        False for a conda package that holds no Python code (a C library, a binary).
    """

    name: str
    specifier: str = ""
    source: Source = "index"
    root: bool = True
    extras: tuple[str, ...] = ()
    marker: str | None = None
    url: str | None = None
    conda_name: str | None = None
    python: bool = True

    @property
    def version(self) -> str | None:
        """The exact version for a ``==`` pin, else None."""
        match = re.fullmatch(r"===?\s*([^,;\s]+)", self.specifier.strip())
        return match.group(1) if match else None

    def requirement(self, *, with_marker: bool = True) -> str:
        """The PEP 508 requirement string, e.g. ``jax[cuda12]==0.4.30``."""
        extras = f"[{','.join(sorted(self.extras))}]" if self.extras else ""
        text = (
            f"{self.name}{extras} @ {self.url}"
            if self.url
            else (f"{self.name}{extras}{self.specifier}")
        )
        if with_marker and self.marker:
            text += f" ; {self.marker}"
        return text


@dataclass(frozen=True)
class LocalCode:
    """Code that exists only on this machine and is shipped to the VM as a wheel.

    Parameters
    ----------
    name : str
        Distribution name (canonical); generated (``rawvm-local-<dir>``) for loose modules.
    path : str
        Project directory (``kind="project"``), directory holding the modules
        (``kind="modules"``), or wheel file (``kind="wheel"``).
    kind : {"project", "modules", "wheel"}
        How the wheel is made: built from a project, generated from loose modules, or as is.
    modules : tuple of str
        For ``kind="modules"``: the top-level ``.py`` files and packages shipped.
    version : str, optional
        Installed version, for display.
    editable : bool
        Installed in editable mode here.
    """

    name: str
    path: str
    kind: LocalKind = "project"
    modules: tuple[str, ...] = ()
    version: str | None = None
    editable: bool = False


@dataclass(frozen=True)
class IndexConfig:
    """Package indexes the user's tools are configured with.

    Parameters
    ----------
    index_url : str, optional
        The default index (None: PyPI).
    extra_index_urls, find_links : tuple of str
        Additional indexes and find-links locations.
    no_index : bool
        Only ``find_links`` are used.
    sources : tuple of str
        Where each setting came from (file paths and variable names), for the report.
    best_match : bool
        Pick each version from whichever index has it, as pip does (set when the indexes come
        from pip's configuration: the environment was installed that way). uv's default only
        looks at the first index holding a package, a defence against dependency confusion.
    """

    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = ()
    no_index: bool = False
    sources: tuple[str, ...] = ()
    best_match: bool = False

    def uv_args(self) -> list[str]:
        """Command-line options for ``uv pip compile|sync|install``."""
        args: list[str] = []
        if self.no_index:
            args.append("--no-index")
        elif self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls if not self.no_index else ():
            args += ["--extra-index-url", url]
        for link in self.find_links:
            args += ["--find-links", link]
        if self.best_match and self.extra_index_urls and not self.no_index:
            args += ["--index-strategy", "unsafe-best-match"]
        return args

    def requirement_lines(self) -> list[str]:
        """The same options as ``requirements.txt`` lines, for the VM's installer.

        These may carry credentials: the bundle holding them is a secret, like the config
        files they came from (it is never put in user-data).
        """
        lines: list[str] = []
        if self.no_index:
            lines.append("--no-index")
        elif self.index_url:
            lines.append(f"--index-url {self.index_url}")
        lines += [f"--extra-index-url {u}" for u in self.extra_index_urls if not self.no_index]
        lines += [f"--find-links {link}" for link in self.find_links]
        return lines

    def redacted(self) -> dict[str, object]:
        """The configuration with passwords and tokens masked, safe to print or log."""
        return {
            "index_url": redact_url(self.index_url) if self.index_url else None,
            "extra_index_urls": [redact_url(u) for u in self.extra_index_urls],
            "find_links": [redact_url(u) for u in self.find_links],
            "no_index": self.no_index,
            "best_match": self.best_match,
            "sources": list(self.sources),
        }

    def cache_key(self) -> dict[str, object]:
        """What changes the resolution (the credentials too: they pick what is visible)."""
        return {
            "index_url": self.index_url,
            "extra_index_urls": list(self.extra_index_urls),
            "find_links": list(self.find_links),
            "no_index": self.no_index,
            "best_match": self.best_match,
        }

    def merged(self, other: IndexConfig) -> IndexConfig:
        """This configuration with ``other``'s default index (if any) and extra locations."""
        return IndexConfig(
            index_url=other.index_url or self.index_url,
            extra_index_urls=_unique(self.extra_index_urls + other.extra_index_urls),
            find_links=_unique(self.find_links + other.find_links),
            no_index=self.no_index or other.no_index,
            sources=_unique(self.sources + other.sources),
            best_match=self.best_match or other.best_match,
        )


@dataclass(frozen=True)
class EnvironmentSpec:
    """The user's environment, independent of any target platform.

    Parameters
    ----------
    origin : str
        ``"local"``, ``"requirements"`` or the path of the lock file read.
    packages : tuple of PackagePin
        Packages to fetch from indexes or URLs, sorted by name.
    local_code : tuple of LocalCode
        Code to ship as wheels.
    index : IndexConfig
        Package indexes to resolve against.
    python_version : str, optional
        ``"X.Y"`` the environment was made with, when known.
    ignore : tuple of str
        Canonical names the user excluded (``environment_ignore``).
    notes : tuple of str
        What the inventory left out and why.
    conda_channels : tuple of str
        Channels of a conda environment or lock (not used for resolution: see translate).
    """

    origin: str
    packages: tuple[PackagePin, ...] = ()
    local_code: tuple[LocalCode, ...] = ()
    index: IndexConfig = field(default_factory=IndexConfig)
    python_version: str | None = None
    ignore: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    conda_channels: tuple[str, ...] = ()

    def names(self) -> set[str]:
        """Canonical names of every package and local distribution."""
        return {p.name for p in self.packages} | {c.name for c in self.local_code}


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def resolve_environment_spec(
    environment: str | os.PathLike[str] | Sequence[str] = "local",
    ignore: Iterable[str] = (),
) -> EnvironmentSpec:
    """Turn ``RawVMCluster(environment=..., environment_ignore=...)`` into a spec.

    Parameters
    ----------
    environment : "local", list of str, or path
        ``"local"``: the running environment (:func:`inventory_environment`). A list: PEP 508
        requirements (and ``requirements.txt`` option lines such as ``-e ./pkg`` or
        ``--index-url URL``). A path: ``requirements.txt`` (pins, hashes, ``-e`` lines,
        ``--index-url`` lines), ``uv.lock`` or ``conda-lock.yml``.
    ignore : iterable of str
        Package names to leave out on the VMs (recorded as decisions by the translation).

    Returns
    -------
    EnvironmentSpec

    Raises
    ------
    EnvironmentSpecError
        The argument is neither ``"local"``, a list, nor an existing lock file.
    """
    ignored = tuple(sorted({canonicalize_name(name) for name in ignore}))
    if isinstance(environment, str) and environment == "local":
        spec = inventory_environment()
    elif isinstance(environment, (str, os.PathLike)):
        spec = read_lock_file(environment)
    elif isinstance(environment, Sequence):
        spec = parse_requirement_lines(list(environment), base_dir=Path.cwd())
        spec = replace(spec, index=read_index_config().merged(spec.index))
    else:
        raise EnvironmentSpecError(
            f"environment must be 'local', a list of requirements or a lock file path, "
            f"not {type(environment).__name__}"
        )
    return replace(spec, ignore=ignored)


def read_lock_file(path: str | os.PathLike[str]) -> EnvironmentSpec:
    """Read ``requirements.txt``, ``uv.lock`` or ``conda-lock.yml`` by its name.

    Parameters
    ----------
    path : path-like
        The lock file.

    Returns
    -------
    EnvironmentSpec
    """
    file = Path(path)
    if not file.is_file():
        raise EnvironmentSpecError(
            f"environment={str(path)!r} is not 'local' and no such lock file exists "
            "(a list of requirements must be passed as a list)"
        )
    name = file.name.lower()
    if name.endswith(".lock") or name.endswith(".toml"):
        return parse_uv_lock(file)
    if name.endswith((".yml", ".yaml")):
        return parse_conda_lock(file)
    spec = parse_requirements_file(file)
    return replace(spec, index=read_index_config().merged(spec.index))


# --------------------------------------------------------------------------------------------
# Inventory of an installed environment
# --------------------------------------------------------------------------------------------

#: Top-level names never shipped as loose local modules: build/test scaffolding, not code the
#: workers import, and names that would shadow real packages on the VM.
_NOT_LOOSE = frozenset(
    {"setup", "conftest", "noxfile", "tasks", "tests", "test", "docs", "doc", "build", "dist"}
)


@dataclass
class _Dist:
    name: str
    version: str
    requires: list[str]
    direct_url: dict[str, object] | None
    installer: str
    egg: bool = False


def inventory_environment(
    path: Sequence[str] | None = None,
    prefix: str | os.PathLike[str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> EnvironmentSpec:
    """Inventory an installed Python environment (default: the running one).

    Parameters
    ----------
    path : sequence of str, optional
        The ``sys.path`` to scan (default ``sys.path``).
    prefix : path-like, optional
        The environment's prefix (default ``sys.prefix``); directories inside it are not local
        code, and ``<prefix>/conda-meta`` is read if present.
    cwd : path-like, optional
        Working directory, scanned for loose modules (default: the current one).
    environ : mapping, optional
        Environment variables for the index configuration (default ``os.environ``).

    Returns
    -------
    EnvironmentSpec
        With ``origin="local"``.
    """
    default = path is None
    paths = list(sys.path if path is None else path)
    here = Path(cwd) if cwd is not None else Path.cwd()
    env_prefix = Path(prefix) if prefix is not None else Path(sys.prefix)
    dists = _scan_distributions(paths, here)
    conda = read_conda_meta(env_prefix)
    packages, local_code, notes = _classify(dists, conda)
    prefixes = {env_prefix.resolve()}
    if default:
        prefixes |= {Path(sys.base_prefix).resolve(), Path(sys.exec_prefix).resolve()}
    skip_dirs = prefixes | {Path(c.path).resolve() for c in local_code if c.kind == "project"}
    loose = _loose_modules(paths, here, skip_dirs, set(dists))
    python = f"{sys.version_info.major}.{sys.version_info.minor}" if default else None
    return EnvironmentSpec(
        origin="local",
        packages=tuple(sorted(packages, key=lambda p: p.name)),
        local_code=tuple(local_code + loose),
        index=read_index_config(environ=environ, cwd=here, prefix=env_prefix),
        python_version=python or _python_version_of(paths),
        notes=tuple(notes),
        conda_channels=tuple(sorted({str(c["channel"]) for c in conda.values() if c["channel"]})),
    )


def _scan_distributions(paths: Sequence[str], cwd: Path) -> dict[str, _Dist]:
    # Reading the dist-info directories ourselves (one METADATA read each, headers only) is
    # 3-4x faster than importlib.metadata's email parser and finds the same distributions, in
    # the same precedence: the first on the path wins, as for imports.
    found: dict[str, _Dist] = {}
    for entry in paths:
        directory = Path(entry or cwd)
        try:
            names = sorted(os.listdir(directory))
        except OSError:
            continue
        for name in names:
            if name.endswith((".dist-info", ".egg-info")):
                dist = _read_distribution(directory / name)
                if dist is None:
                    continue
                # A source checkout on the path often holds a stale ``*.egg-info`` build
                # artifact next to the real (editable) ``.dist-info`` installed later on the
                # path: the dist-info is the installed truth.
                previous = found.get(dist.name)
                if previous is None or (previous.egg and not dist.egg):
                    found[dist.name] = dist
    return found


def _read_distribution(info: Path) -> _Dist | None:
    meta_file = info / ("METADATA" if info.suffix == ".dist-info" else "PKG-INFO")
    if info.is_file():  # a bare .egg-info file (distutils) is PKG-INFO itself
        meta_file = info
    try:
        text = meta_file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    headers = _headers(text)
    name, version = headers.get("name", [""])[0], headers.get("version", [""])[0]
    if not name or not version:
        return None
    requires = headers.get("requires-dist", [])
    if info.suffix == ".egg-info" and info.is_dir():
        requires = _egg_requires(info / "requires.txt")
    return _Dist(
        name=canonicalize_name(name),
        version=version,
        requires=requires,
        direct_url=_read_json(info / "direct_url.json"),
        installer=_read_text(info / "INSTALLER").strip(),
        egg=info.suffix == ".egg-info",
    )


def _headers(text: str) -> dict[str, list[str]]:
    headers: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        if not line or line[0] in " \t" or ":" not in line:
            continue  # continuation lines only occur in Description/License, not needed here
        key, _, value = line.partition(":")
        headers.setdefault(key.strip().lower(), []).append(value.strip())
    return headers


def _egg_requires(file: Path) -> list[str]:
    requires: list[str] = []
    extra = ""
    for line in _read_text(file).splitlines():
        line = line.strip()
        if line.startswith("["):
            extra = line.strip("[]").split(":")[0]
        elif line:
            requires.append(f'{line} ; extra == "{extra}"' if extra else line)
    return requires


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


def _read_json(file: Path) -> dict[str, object] | None:
    text = _read_text(file)
    if not text:
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def _classify(
    dists: dict[str, _Dist], conda: dict[str, dict[str, object]]
) -> tuple[list[PackagePin], list[LocalCode], list[str]]:
    """Split distributions into index/VCS/URL pins and local code; mark the roots."""
    local_code: list[LocalCode] = []
    local_names: set[str] = set()
    remote: dict[str, PackagePin] = {}
    notes: list[str] = []
    for dist in dists.values():
        item = _pin_or_local(dist)
        if isinstance(item, LocalCode):
            local_code.append(item)
            local_names.add(dist.name)
        elif isinstance(item, str):
            notes.append(item)
        else:
            remote[dist.name] = item
    roots, root_extras = _root_names(dists, local_names)
    conda_by_pypi = {str(c["pypi_name"]): c for c in conda.values() if c["python"]}
    pins = []
    for name, pin in remote.items():
        record = conda_by_pypi.get(name)
        conda_name = str(record["name"]) if record else None
        extras = tuple(sorted(root_extras.get(name, ())))
        pins.append(replace(pin, root=name in roots, conda_name=conda_name, extras=extras))
    pins += _conda_only_pins(conda, set(dists), notes)
    return pins, local_code, notes


def _pin_or_local(dist: _Dist) -> PackagePin | LocalCode | str:
    """Classify by PEP 610 ``direct_url.json``; a string is a note (the dist is skipped)."""
    info = dist.direct_url
    if not info:
        return PackagePin(dist.name, f"=={dist.version}")
    url = str(info.get("url", ""))
    dir_info = info.get("dir_info")
    vcs_info = info.get("vcs_info")
    if isinstance(dir_info, dict):
        return LocalCode(
            dist.name,
            _file_url_path(url),
            "project",
            version=dist.version,
            editable=bool(dir_info.get("editable")),
        )
    if isinstance(vcs_info, dict):
        commit = vcs_info.get("commit_id") or vcs_info.get("requested_revision") or ""
        vcs = vcs_info.get("vcs", "git")
        subdir = info.get("subdirectory")
        full = f"{vcs}+{url}@{commit}" + (f"#subdirectory={subdir}" if subdir else "")
        return PackagePin(dist.name, f"=={dist.version}", "vcs", url=full)
    if url.startswith("file:"):
        file = _file_url_path(url)
        if file.endswith(".whl") and os.path.isfile(file):
            return LocalCode(dist.name, file, "wheel", version=dist.version)
        return (
            f"{dist.name}=={dist.version} was installed from the local archive {file}, which "
            "the VMs cannot fetch; install it from an index, or put the wheel back"
        )
    return PackagePin(dist.name, f"=={dist.version}", "url", url=url)


def _file_url_path(url: str) -> str:
    parts = urlsplit(url)
    return unquote(parts.path) if parts.scheme == "file" else url


def _root_names(
    dists: dict[str, _Dist], local_names: set[str]
) -> tuple[set[str], dict[str, set[str]]]:
    """Distributions no installed index package depends on (or that local code needs).

    Local code is installed on the VM without its dependencies (it is a prebuilt wheel), so
    what it needs must be asked for explicitly, with the extras it asks for: those are roots
    too. Returns the root names and the extras local code requests of each.
    """
    required: set[str] = set()
    needed_by_local: dict[str, set[str]] = {}
    for dist in dists.values():
        active = _active_requirements(dist, dists)
        if dist.name in local_names:
            for name, extras in active.items():
                needed_by_local.setdefault(name, set()).update(extras)
        else:
            required.update(active)
    return (set(dists) - required) | set(needed_by_local), needed_by_local


def _active_requirements(dist: _Dist, dists: Mapping[str, object]) -> dict[str, set[str]]:
    # An extra counts as requested when everything it adds is installed: there is no record
    # of which extras the user asked for, and extras often name packages installed for
    # another reason (pytest in a "test" extra) that must stay roots.
    by_extra: dict[str, list[Requirement]] = {}
    for text in dist.requires:
        try:
            req = Requirement(text)
        except InvalidRequirement:
            continue
        extra = _extra_of(req)
        by_extra.setdefault(extra, []).append(req)
    names: dict[str, set[str]] = {}
    for extra, reqs in by_extra.items():
        active = [r for r in reqs if _marker_true(r.marker, extra)]
        if extra and not all(canonicalize_name(r.name) in dists for r in active):
            continue
        for req in active:
            names.setdefault(canonicalize_name(req.name), set()).update(req.extras)
    return names


_EXTRA_RE = re.compile(r"""extra\s*==\s*['"]([^'"]+)['"]""")


def _extra_of(req: Requirement) -> str:
    match = _EXTRA_RE.search(str(req.marker)) if req.marker else None
    return canonicalize_name(match.group(1)) if match else ""


def _marker_true(marker: Marker | None, extra: str) -> bool:
    if marker is None:
        return True
    try:
        return marker.evaluate({"extra": extra})
    except Exception:  # an unknown marker variable: count the edge, the safe direction
        return True


def _python_version_of(paths: Sequence[str]) -> str | None:
    for entry in paths:
        match = re.search(r"python(\d+\.\d+)", entry)
        if match:
            return match.group(1)
    return None


def _loose_modules(
    paths: Sequence[str], cwd: Path, skip_dirs: set[Path], installed: set[str]
) -> list[LocalCode]:
    """Directories outside the environment holding importable ``.py`` code."""
    system = {Path(p).resolve() for p in sysconfig.get_paths().values() if p}
    result: list[LocalCode] = []
    seen: set[Path] = set()
    for entry in [str(cwd), *paths]:
        directory = Path(entry or cwd).resolve()
        if directory in seen or not directory.is_dir() or _inside(directory, skip_dirs | system):
            continue
        seen.add(directory)
        if directory.name in ("site-packages", "dist-packages"):
            continue
        modules = _modules_in(directory, installed)
        if modules:
            slug = canonicalize_name(directory.name or "root") or "root"
            result.append(LocalCode(f"rawvm-local-{slug}", str(directory), "modules", modules))
    return result


def _inside(directory: Path, roots: set[Path]) -> bool:
    return any(directory == root or root in directory.parents for root in roots)


def _modules_in(directory: Path, installed: set[str]) -> tuple[str, ...]:
    modules = []
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError:
        return ()
    for entry in entries:
        name = entry.name
        if name.startswith((".", "_")) and name != "__main__.py":
            continue
        if entry.is_file() and name.endswith(".py"):
            module = name[:-3]
        elif entry.is_dir() and os.path.isfile(os.path.join(entry.path, "__init__.py")):
            module = name
        else:
            continue
        if (
            module.isidentifier()
            and module not in _NOT_LOOSE
            and (canonicalize_name(module) not in installed)
        ):
            modules.append(name)
    return tuple(modules)


# --------------------------------------------------------------------------------------------
# conda
# --------------------------------------------------------------------------------------------

#: conda names whose PyPI distribution is named differently. conda-forge names some packages
#: after the upstream project (pytorch), with a ``py-`` prefix for Python bindings of a C/C++
#: library (py-opencv, py-xgboost), or splits a package (matplotlib-base). The complete mapping
#: lives in services this machine may not reach, so only the common divergent ones are kept;
#: any other conda Python package is assumed to have its PyPI name (true for the vast majority).
CONDA_TO_PYPI: dict[str, str] = {
    "pytorch": "torch",
    "pytorch-cpu": "torch",
    "pytorch-gpu": "torch",
    "py-opencv": "opencv-python",
    "opencv": "opencv-python",
    "tensorflow-gpu": "tensorflow",
    "py-xgboost": "xgboost",
    "py-xgboost-cpu": "xgboost-cpu",
    "py-xgboost-gpu": "xgboost",
    "py-lightgbm": "lightgbm",
    "matplotlib-base": "matplotlib",
    "msgpack-python": "msgpack",
    "python-graphviz": "graphviz",
    "pytables": "tables",
    "pyqt": "pyqt5",
    "ruamel_yaml": "ruamel-yaml",
    "python-kaleido": "kaleido",
    "python-tzdata": "tzdata",
    "python-fastjsonschema": "fastjsonschema",
    "python-lmdb": "lmdb",
    "gdal": "gdal",
    "py-spy": "py-spy",
    "arrow": "arrow",
    "pyarrow-core": "pyarrow",
    "dask-core": "dask",
    "distributed": "distributed",
}

#: conda packages with no Python code that the VM does not need: the interpreter and its C
#: libraries (the VM's Python has its own), and native libraries that PyPI wheels vendor.
CONDA_RUNTIME = frozenset(
    {
        "python",
        "python_abi",
        "pip",
        "ca-certificates",
        "openssl",
        "tzdata",
        "ncurses",
        "readline",
        "sqlite",
        "tk",
        "xz",
        "zlib",
        "bzip2",
        "zstd",
        "lz4-c",
        "krb5",
        "icu",
        "expat",
        "keyutils",
        "c-ares",
        "cudatoolkit",
        "cudnn",
        "nccl",
        "blas",
        "openblas",
        "mkl",
        "intel-openmp",
        "llvm-openmp",
        "tbb",
        "ld_impl_linux-64",
        "ld_impl_linux-aarch64",
    }
)


def conda_to_pypi(conda_name: str) -> str:
    """The PyPI name of a conda package (see :data:`CONDA_TO_PYPI`)."""
    return canonicalize_name(CONDA_TO_PYPI.get(conda_name, conda_name))


def is_conda_runtime(conda_name: str) -> bool:
    """True for conda packages the VM's Python and PyPI wheels make unnecessary."""
    return (
        conda_name in CONDA_RUNTIME
        or conda_name.startswith(("lib", "_", "cuda-", "mkl"))
        or conda_name.endswith(("-devel", "_impl"))
    )


def read_conda_meta(prefix: str | os.PathLike[str]) -> dict[str, dict[str, object]]:
    """Read ``<prefix>/conda-meta/*.json``.

    Parameters
    ----------
    prefix : path-like
        A conda environment's prefix.

    Returns
    -------
    dict
        conda name -> ``{"name", "version", "channel", "requested", "python", "pypi_name",
        "depends"}``; empty when the prefix is not a conda environment.
    """
    meta = Path(prefix) / "conda-meta"
    if not meta.is_dir():
        return {}
    records: dict[str, dict[str, object]] = {}
    for file in sorted(meta.glob("*.json")):
        data = _read_json(file)
        if not data or "name" not in data:
            continue
        name = str(data["name"])
        files = _as_list(data.get("files"))
        depends = [str(d).split()[0] for d in _as_list(data.get("depends"))]
        records[name] = {
            "name": name,
            "version": str(data.get("version", "")),
            "channel": _channel_name(str(data.get("channel") or "")),
            "requested": bool(data.get("requested_spec")),
            "python": any("site-packages/" in str(f) for f in files) or "python" in depends,
            "pypi_name": conda_to_pypi(name),
            "depends": depends,
        }
    return records


def _channel_name(channel: str) -> str:
    return channel.rstrip("/").rsplit("/", 2)[-2] if "/" in channel else channel


def _conda_only_pins(
    conda: dict[str, dict[str, object]], installed: set[str], notes: list[str]
) -> list[PackagePin]:
    """Pins for conda packages not also visible as Python distributions."""
    pins: list[PackagePin] = []
    for record in conda.values():
        name, pypi = str(record["name"]), str(record["pypi_name"])
        if name in CONDA_RUNTIME or (record["python"] and pypi in installed):
            continue  # seen through its .dist-info already
        if not record["python"] and is_conda_runtime(name):
            continue
        if not record["python"] and not record["requested"]:
            notes.append(f"conda package {name} (a dependency with no Python code) is not needed")
            continue
        pins.append(
            PackagePin(
                pypi,
                f"=={record['version']}",
                "conda",
                root=bool(record["requested"]),
                conda_name=name,
                python=bool(record["python"]),
            )
        )
    return pins


# --------------------------------------------------------------------------------------------
# Index configuration (pip and uv)
# --------------------------------------------------------------------------------------------


def read_index_config(
    environ: Mapping[str, str] | None = None,
    cwd: str | os.PathLike[str] | None = None,
    prefix: str | os.PathLike[str] | None = None,
    home: str | os.PathLike[str] | None = None,
) -> IndexConfig:
    """Read private index settings from pip and uv configuration.

    pip: ``pip.conf`` files (global, user, environment, ``PIP_CONFIG_FILE``) then
    ``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``, ``PIP_FIND_LINKS``. uv: ``uv.toml`` (system,
    user, project) then ``UV_DEFAULT_INDEX``/``UV_INDEX_URL``, ``UV_INDEX``/``UV_EXTRA_INDEX_URL``,
    ``UV_FIND_LINKS``. Later sources override the default index; extra locations add up.

    Parameters
    ----------
    environ : mapping, optional
        Environment variables (default ``os.environ``).
    cwd, prefix, home : path-like, optional
        Project directory (for ``uv.toml``), environment prefix (for its ``pip.conf``) and home
        directory (default: the current ones).

    Returns
    -------
    IndexConfig
    """
    env = os.environ if environ is None else environ
    home_dir = Path(home) if home is not None else Path.home()
    config = IndexConfig()
    for layer in (
        *_pip_files(env, home_dir, Path(prefix) if prefix else Path(sys.prefix)),
        _pip_env(env),
        *_uv_files(env, home_dir, Path(cwd) if cwd else Path.cwd()),
        _uv_env(env),
    ):
        config = config.merged(layer)
    return config


def _pip_files(env: Mapping[str, str], home: Path, prefix: Path) -> list[IndexConfig]:
    import configparser

    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    files = [
        Path("/etc/xdg/pip/pip.conf"),
        Path("/etc/pip.conf"),
        home / ".pip" / "pip.conf",
        xdg / "pip" / "pip.conf",
        prefix / "pip.conf",
    ]
    if env.get("PIP_CONFIG_FILE"):
        if env["PIP_CONFIG_FILE"] == os.devnull:
            return []
        files.append(Path(env["PIP_CONFIG_FILE"]))
    layers = []
    for file in files:
        if not file.is_file():
            continue
        parser = configparser.RawConfigParser()
        try:
            parser.read(file, encoding="utf-8")
        except configparser.Error:
            continue
        values: dict[str, str] = {}
        for section in ("global", "install"):
            if parser.has_section(section):
                values.update(parser.items(section))
        layers.append(_pip_layer(values, str(file)))
    return layers


def _pip_layer(values: Mapping[str, str], source: str) -> IndexConfig:
    index = values.get("index-url") or values.get("index_url")
    extra = (values.get("extra-index-url") or values.get("extra_index_url") or "").split()
    links = (values.get("find-links") or values.get("find_links") or "").split()
    no_index = str(values.get("no-index", "")).lower() in ("1", "true", "yes", "on")
    if not (index or extra or links or no_index):
        return IndexConfig()
    return IndexConfig(index, tuple(extra), tuple(links), no_index, (source,), best_match=True)


def _pip_env(env: Mapping[str, str]) -> IndexConfig:
    values = {
        "index-url": env.get("PIP_INDEX_URL", ""),
        "extra-index-url": env.get("PIP_EXTRA_INDEX_URL", ""),
        "find-links": env.get("PIP_FIND_LINKS", ""),
        "no-index": env.get("PIP_NO_INDEX", ""),
    }
    names = [k for k in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS") if env.get(k)]
    return _pip_layer(values, ",".join(names))


def _uv_files(env: Mapping[str, str], home: Path, cwd: Path) -> list[IndexConfig]:
    if env.get("UV_NO_CONFIG"):
        return []
    xdg = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    files = [Path("/etc/uv/uv.toml"), xdg / "uv" / "uv.toml"]
    if env.get("UV_CONFIG_FILE"):
        files = [Path(env["UV_CONFIG_FILE"])]
    else:
        project = _find_project_config(cwd)
        if project is not None:
            files.append(project)
    layers = []
    for file in files:
        if not file.is_file():
            continue
        try:
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError):
            continue
        if file.name == "pyproject.toml":
            data = data.get("tool", {}).get("uv", {})
        layers.append(_uv_layer(data, str(file)))
    return layers


def _find_project_config(cwd: Path) -> Path | None:
    # uv uses the nearest uv.toml, else the nearest pyproject.toml with a [tool.uv] table.
    for directory in (cwd, *cwd.parents):
        if (directory / "uv.toml").is_file():
            return directory / "uv.toml"
        pyproject = directory / "pyproject.toml"
        if pyproject.is_file() and "[tool.uv" in _read_text(pyproject):
            return pyproject
    return None


def _uv_layer(data: Mapping[str, object], source: str) -> IndexConfig:
    pip = data.get("pip")
    merged: dict[str, object] = dict(data)
    if isinstance(pip, dict):
        merged.update(pip)
    index = merged.get("index-url")
    extra = [str(x) for x in _as_list(merged.get("extra-index-url"))]
    for entry in _as_list(merged.get("index")):
        if isinstance(entry, dict) and entry.get("url"):
            if entry.get("default"):
                index = entry["url"]
            elif not entry.get("explicit"):
                extra.append(str(entry["url"]))
    links = tuple(str(x) for x in _as_list(merged.get("find-links")))
    no_index = bool(merged.get("no-index"))
    if not (index or extra or links or no_index):
        return IndexConfig()
    return IndexConfig(str(index) if index else None, tuple(extra), links, no_index, (source,))


def _as_list(value: object) -> list[object]:
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


def _uv_env(env: Mapping[str, str]) -> IndexConfig:
    index = env.get("UV_DEFAULT_INDEX") or env.get("UV_INDEX_URL") or None
    extra = env.get("UV_INDEX", "").split() + env.get("UV_EXTRA_INDEX_URL", "").split()
    # UV_INDEX entries may be named: "name=https://..."
    extra = [e.split("=", 1)[1] if re.match(r"^[\w.-]+=", e) else e for e in extra]
    links = [x for x in re.split(r"[\s,]+", env.get("UV_FIND_LINKS", "")) if x]
    no_index = env.get("UV_NO_INDEX", "").lower() in ("1", "true", "yes")
    names = [
        k
        for k in ("UV_DEFAULT_INDEX", "UV_INDEX_URL", "UV_INDEX", "UV_EXTRA_INDEX_URL")
        if env.get(k)
    ]
    if not (index or extra or links or no_index):
        return IndexConfig()
    return IndexConfig(index, tuple(extra), tuple(links), no_index, (",".join(names),))


def redact_url(url: str) -> str:
    """Mask the password (or token) of a URL, for display.

    Parameters
    ----------
    url : str
        For example ``https://user:secret@host/simple``.

    Returns
    -------
    str
        ``https://user:****@host/simple``; a lone token user (``https://TOKEN@host``) is masked
        too, since tokens are often passed that way.
    """
    parts = urlsplit(url)
    if not parts.netloc or "@" not in parts.netloc:
        return url
    userinfo, _, host = parts.netloc.rpartition("@")
    user, sep, _password = userinfo.partition(":")
    masked = f"{user}:****" if sep else "****"
    return parts._replace(netloc=f"{masked}@{host}").geturl()


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(i for i in items if i))


# --------------------------------------------------------------------------------------------
# requirements.txt (pip-compile, uv pip compile, hand-written) and requirement lists
# --------------------------------------------------------------------------------------------


def parse_requirements_file(path: str | os.PathLike[str]) -> EnvironmentSpec:
    """Read a ``requirements.txt``, following ``-r`` and ``-c`` includes.

    Parameters
    ----------
    path : path-like
        The file. ``# via`` annotations (pip-compile, uv) tell roots from dependencies; without
        them every line is a root.

    Returns
    -------
    EnvironmentSpec
    """
    file = Path(path)
    lines = file.read_text(encoding="utf-8").splitlines()
    spec = parse_requirement_lines(lines, base_dir=file.parent, annotated=True)
    return replace(spec, origin=str(file))


def parse_requirement_lines(
    lines: Sequence[str], base_dir: Path, annotated: bool = False
) -> EnvironmentSpec:
    """Parse requirement lines (a requirements file's or the ``environment=[...]`` list).

    Parameters
    ----------
    lines : sequence of str
        Raw lines: requirements, ``-e``/``-r``/``-c``/``--index-url`` options, comments.
    base_dir : Path
        Directory relative paths are resolved against.
    annotated : bool
        Read ``# via`` comments to mark dependencies (False for a hand-written list).

    Returns
    -------
    EnvironmentSpec
        With ``origin="requirements"``.
    """
    state = _ReqState(base_dir)
    for logical, via in _logical_lines(lines):
        state.add(logical, via if annotated else None)
    return state.spec()


def _logical_lines(lines: Sequence[str]) -> list[tuple[str, list[str]]]:
    """Join continuations; attach each ``# via`` annotation block to its requirement."""
    result: list[tuple[str, list[str]]] = []
    buffer = ""
    in_via = False
    for raw in lines:
        stripped = raw.strip()
        if stripped.startswith("#"):
            comment = stripped.lstrip("#").strip()
            if result and raw[:1] in " \t" and comment.startswith("via"):
                rest = comment[3:].strip()
                result[-1][1].extend([rest] if rest else [])
                in_via = True
            elif result and in_via and raw[:1] in " \t" and comment:
                result[-1][1].append(comment)
            else:
                in_via = False
            continue
        in_via = False
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if line.endswith("\\"):
            buffer += line[:-1] + " "
            continue
        line = (buffer + line).strip()
        buffer = ""
        if line:
            result.append((line, []))
    return result


class _ReqState:
    """Accumulates what requirement lines say (a small state machine over options)."""

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = base_dir
        self.pins: dict[str, PackagePin] = {}
        self.via: dict[str, list[str]] = {}
        self.constraints: set[str] = set()
        self.local: list[LocalCode] = []
        self.index = IndexConfig()
        self.notes: list[str] = []

    def add(self, line: str, via: list[str] | None, constraint: bool = False) -> None:
        words = line.split()
        option = words[0]
        if option.startswith("-"):
            self._option(option, words[1:], line, constraint)
            return
        self._requirement(line, via, constraint)

    def _option(self, option: str, args: list[str], line: str, constraint: bool) -> None:
        if "=" in option and option.startswith("--"):
            option, _, value = option.partition("=")
            args = [value, *args]
        value = args[0] if args else ""
        if option in ("-i", "--index-url"):
            self.index = self.index.merged(IndexConfig(index_url=value, sources=("lock file",)))
        elif option == "--extra-index-url":
            self.index = self.index.merged(IndexConfig(extra_index_urls=(value,)))
        elif option in ("-f", "--find-links"):
            self.index = self.index.merged(IndexConfig(find_links=(self._link(value),)))
        elif option == "--no-index":
            self.index = self.index.merged(IndexConfig(no_index=True))
        elif option in ("-e", "--editable"):
            self._editable(value)
        elif option in ("-r", "--requirement", "-c", "--constraint"):
            self._include(value, constraint or option in ("-c", "--constraint"))
        else:
            self.notes.append(f"ignored option line: {line}")

    def _link(self, value: str) -> str:
        if "://" in value:
            return value
        return str((self.base_dir / value).resolve())

    def _editable(self, value: str) -> None:
        if "://" in value or value.startswith(("git+", "hg+", "svn+", "bzr+")):
            url, _, fragment = value.partition("#")
            name = re.search(r"egg=([\w.-]+)", fragment)
            if not name:
                raise EnvironmentSpecError(f"-e {value}: add #egg=NAME to name the package")
            canonical = canonicalize_name(name.group(1))
            self.pins[canonical] = PackagePin(canonical, "", "vcs", url=url)
            return
        directory = (self.base_dir / value).resolve()
        self.local.append(LocalCode(_project_name(directory), str(directory), editable=True))

    def _include(self, value: str, constraint: bool) -> None:
        file = self.base_dir / value
        if not file.is_file():
            raise EnvironmentSpecError(f"included requirements file {file} does not exist")
        sub = _ReqState(file.parent)
        sub.index = self.index
        for logical, via in _logical_lines(file.read_text(encoding="utf-8").splitlines()):
            sub.add(logical, via, constraint)
        self.pins.update(sub.pins)
        self.via.update(sub.via)
        self.constraints |= sub.constraints
        self.local += sub.local
        self.index = sub.index
        self.notes += sub.notes

    def _requirement(self, line: str, via: list[str] | None, constraint: bool) -> None:
        if line.startswith((".", "/")) or line.startswith("file:"):
            path = (self.base_dir / _file_url_path(line.split()[0])).resolve()
            kind: LocalKind = "wheel" if path.suffix == ".whl" else "project"
            self.local.append(LocalCode(_project_name(path), str(path), kind))
            return
        text = line.split(" --", 1)[0].strip()  # drop per-requirement options (--hash=...)
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise EnvironmentSpecError(f"cannot parse requirement {text!r}: {exc}") from None
        name = canonicalize_name(req.name)
        source: Source = "index"
        if req.url:
            source = "vcs" if re.match(r"^(git|hg|svn|bzr)\+", req.url) else "url"
        self.pins[name] = PackagePin(
            name,
            str(req.specifier),
            source,
            extras=tuple(sorted(req.extras)),
            marker=str(req.marker) if req.marker else None,
            url=req.url or None,
        )
        if via is not None:
            self.via[name] = via
        if constraint:
            self.constraints.add(name)

    def spec(self) -> EnvironmentSpec:
        local_names = {c.name for c in self.local}
        pins = []
        for name, pin in self.pins.items():
            pins.append(replace(pin, root=self._is_root(name, local_names)))
        return EnvironmentSpec(
            origin="requirements",
            packages=tuple(sorted(pins, key=lambda p: p.name)),
            local_code=tuple(self.local),
            index=self.index,
            notes=tuple(self.notes),
        )

    def _is_root(self, name: str, local_names: set[str]) -> bool:
        if name in self.constraints:
            return False
        via = self.via.get(name)
        if not via:
            return True
        # "-r requirements.in", "-c ...", "pyproject.toml" or local code: asked for directly.
        for item in via:
            if item.startswith("-") or "." in item or "/" in item:
                return True
            if canonicalize_name(item.split()[0]) in local_names:
                return True
        return False


def _project_name(path: Path) -> str:
    """A local project's distribution name, from pyproject.toml, a wheel name, or the dir."""
    if path.suffix == ".whl":
        return canonicalize_name(path.name.split("-")[0])
    pyproject = path / "pyproject.toml"
    if pyproject.is_file():
        try:
            name = tomllib.loads(_read_text(pyproject)).get("project", {}).get("name")
        except tomllib.TOMLDecodeError:
            name = None
        if name:
            return canonicalize_name(name)
    setup_cfg = _read_text(path / "setup.cfg")
    match = re.search(r"^name\s*=\s*(\S+)", setup_cfg, re.MULTILINE)
    return canonicalize_name(match.group(1) if match else path.name)


# --------------------------------------------------------------------------------------------
# uv.lock
# --------------------------------------------------------------------------------------------


def parse_uv_lock(path: str | os.PathLike[str]) -> EnvironmentSpec:
    """Read a ``uv.lock``: what ``uv sync --no-dev`` would install, as pins.

    Workspace members (``editable``/``directory`` sources) become local code; their
    dependencies are roots; every other locked package is a constraint. Markers on the
    dependency edges and fork markers are kept and evaluated for the target later.

    Parameters
    ----------
    path : path-like
        The ``uv.lock`` file.

    Returns
    -------
    EnvironmentSpec
    """
    file = Path(path)
    try:
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise EnvironmentSpecError(f"{file} is not a valid uv.lock: {exc}") from None
    entries = data.get("package", [])
    local: list[LocalCode] = []
    local_names: set[str] = set()
    indexes: list[str] = []
    for entry in entries:
        code = _uv_local(entry, file.parent)
        if code is not None:
            local_names.add(code.name)
            if code.path:
                local.append(code)
    edges = _uv_edges(entries)
    pins = []
    for entry in entries:
        name = canonicalize_name(entry["name"])
        if name in local_names:
            continue
        pin = _uv_pin(entry, edges.get(name, []), local_names)
        registry = entry.get("source", {}).get("registry")
        if registry and "pypi.org" not in registry:
            indexes.append(registry)
        pins.append(pin)
    return EnvironmentSpec(
        origin=str(file),
        packages=tuple(sorted(pins, key=lambda p: (p.name, p.specifier))),
        local_code=tuple(local),
        index=read_index_config().merged(IndexConfig(extra_index_urls=_unique(indexes))),
    )


def _uv_local(entry: Mapping[str, object], base: Path) -> LocalCode | None:
    source = entry.get("source", {})
    if not isinstance(source, dict):
        return None
    name = canonicalize_name(str(entry["name"]))
    if "virtual" in source:  # a project that is not installed itself: only its dependencies
        return LocalCode(name, "", "project")
    for key in ("editable", "directory"):
        if key in source:
            path = (base / str(source[key])).resolve()
            return LocalCode(
                name,
                str(path),
                editable=key == "editable",
                version=str(entry.get("version", "")) or None,
            )
    if "path" in source:
        path = (base / str(source["path"])).resolve()
        return LocalCode(name, str(path), "wheel" if path.suffix == ".whl" else "project")
    return None


def _uv_edges(entries: Sequence[Mapping[str, object]]) -> dict[str, list[tuple[str, str]]]:
    """name -> [(from package, edge marker or "")] over the non-dev dependencies."""
    edges: dict[str, list[tuple[str, str]]] = {}
    for entry in entries:
        for dep in entry.get("dependencies", []) or []:  # type: ignore[attr-defined]
            target = canonicalize_name(dep["name"])
            edges.setdefault(target, []).append(
                (canonicalize_name(str(entry["name"])), dep.get("marker", ""))
            )
    return edges


def _uv_pin(
    entry: Mapping[str, object], incoming: list[tuple[str, str]], local_names: set[str]
) -> PackagePin:
    name = canonicalize_name(str(entry["name"]))
    version = str(entry.get("version", ""))
    source = entry.get("source", {})
    markers = [m for _, m in incoming]
    marker = None if (not markers or "" in markers) else _any_of(markers)
    forks = entry.get("resolution-markers")
    if isinstance(forks, list) and forks:
        fork = _any_of([str(f) for f in forks])
        marker = f"({marker}) and ({fork})" if marker else fork
    root = any(src in local_names for src, _ in incoming)
    url = None
    kind: Source = "index"
    if isinstance(source, dict) and "git" in source:
        repo, _, commit = str(source["git"]).partition("#")
        url, kind = f"git+{repo.split('?')[0]}@{commit}", "vcs"
    elif isinstance(source, dict) and "url" in source:
        url, kind = str(source["url"]), "url"
    return PackagePin(name, f"=={version}", kind, root=root, marker=marker, url=url)


def _any_of(markers: Sequence[str]) -> str:
    unique = list(dict.fromkeys(markers))
    return unique[0] if len(unique) == 1 else " or ".join(f"({m})" for m in unique)


# --------------------------------------------------------------------------------------------
# conda-lock.yml
# --------------------------------------------------------------------------------------------

_CONDA_PLATFORMS = {"linux-64": "x86_64", "linux-aarch64": "aarch64"}


def parse_conda_lock(path: str | os.PathLike[str], platform: str | None = None) -> EnvironmentSpec:
    """Read a ``conda-lock.yml`` (version 1): its pip packages and its conda packages.

    Parameters
    ----------
    path : path-like
        The lock file.
    platform : str, optional
        conda platform whose entries are read (default: ``linux-64`` if locked, else the first).

    Returns
    -------
    EnvironmentSpec
        conda packages become ``source="conda"`` pins under their PyPI names (roots: those no
        other locked package depends on); ``python_version`` is the locked Python's.
    """
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise EnvironmentSpecError(f"{file} is not valid YAML: {exc}") from None
    if not isinstance(data, dict) or "package" not in data:
        raise EnvironmentSpecError(f"{file} is not a conda-lock file (no 'package' list)")
    entries = [e for e in data["package"] if isinstance(e, dict)]
    platforms = list(dict.fromkeys(str(e.get("platform")) for e in entries))
    chosen = platform or ("linux-64" if "linux-64" in platforms else platforms[0])
    entries = [e for e in entries if e.get("platform") == chosen]
    depended = {canonicalize_name(d) for e in entries for d in (e.get("dependencies") or {})}
    pins, notes, python = [], [], None
    for entry in entries:
        name, version = str(entry["name"]), str(entry["version"])
        if name == "python":
            python = ".".join(version.split(".")[:2])
        pin = _conda_lock_pin(entry, name, version, canonicalize_name(name) in depended)
        if isinstance(pin, str):
            notes.append(pin)
        elif pin is not None:
            pins.append(pin)
    channels = [
        c["url"] if isinstance(c, dict) else str(c)
        for c in (data.get("metadata", {}).get("channels") or [])
    ]
    return EnvironmentSpec(
        origin=str(file),
        packages=tuple(sorted(pins, key=lambda p: p.name)),
        index=read_index_config(),
        python_version=python,
        notes=tuple(notes),
        conda_channels=tuple(channels),
    )


def _conda_lock_pin(
    entry: Mapping[str, object], name: str, version: str, depended: bool
) -> PackagePin | str | None:
    if entry.get("manager") == "pip":
        return PackagePin(canonicalize_name(name), f"=={version}", root=not depended)
    if name in CONDA_RUNTIME:
        return None
    deps = entry.get("dependencies") or {}
    is_python = "python" in deps or name in CONDA_TO_PYPI  # type: ignore[operator]
    if not is_python and is_conda_runtime(name):
        return None
    if not is_python and depended:
        return f"conda package {name} (a dependency with no Python code) is not needed"
    return PackagePin(
        conda_to_pypi(name),
        f"=={version}",
        "conda",
        root=not depended,
        conda_name=name,
        python=is_python,
    )


def installed_distribution(name: str) -> PackagePin | LocalCode | None:
    """How the running environment has ``name``: a pin, local code (editable), or None.

    Used to add what the Dask worker itself needs (``distributed``, ``dask-rawvm``) to an
    environment given as a list or lock file, in the same version as here.
    """
    from importlib import metadata

    try:
        dist = metadata.distribution(name)
    except metadata.PackageNotFoundError:
        return None
    direct_url = dist.read_text("direct_url.json")
    info = _Dist(
        name=canonicalize_name(dist.metadata["Name"]),
        version=dist.version,
        requires=[],
        direct_url=json.loads(direct_url) if direct_url else None,
        installer="",
    )
    item = _pin_or_local(info)
    return None if isinstance(item, str) else item
