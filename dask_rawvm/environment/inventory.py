"""What is installed here: distributions, editable and local code, loose modules.

The fidelity rule starts here: every installed distribution is a pin of the spec, at its
installed version, except dask-rawvm's own client-side dependencies (see
:func:`client_side_only`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from importlib import metadata
from pathlib import Path

from packaging.markers import Marker
from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from dask_rawvm.environment.conda_meta import conda_only_pins, read_conda_meta
from dask_rawvm.environment.indexes import read_index_config
from dask_rawvm.environment.readers import file_url_path, read_json, read_text
from dask_rawvm.environment.spec import AGENT, EnvironmentSpec, LocalCode, PackagePin

logger = logging.getLogger(__name__)

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
    requested: bool = False  # PEP 376 REQUESTED: the user (not a resolver) asked for it


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
    client_side = client_side_only(dists)
    shipped = {n: d for n, d in dists.items() if n not in client_side and n != AGENT}
    packages, local_code, notes = _classify(shipped, conda)
    prefixes = {env_prefix.resolve()}
    if default:
        prefixes |= {Path(sys.base_prefix).resolve(), Path(sys.exec_prefix).resolve()}
    skip_dirs = prefixes | {Path(c.path).resolve() for c in local_code if c.kind == "project"}
    agent = dists.get(AGENT)
    if agent is not None and agent.direct_url:  # an editable checkout of dask-rawvm itself
        skip_dirs.add(Path(file_url_path(str(agent.direct_url.get("url", "")))).resolve())
    loose = _loose_modules(paths, here, skip_dirs, set(dists), notes)
    python = f"{sys.version_info.major}.{sys.version_info.minor}" if default else None
    return EnvironmentSpec(
        origin="local",
        packages=tuple(sorted(packages, key=lambda p: p.name)),
        local_code=tuple(local_code + loose),
        index=read_index_config(environ=environ, cwd=here, prefix=env_prefix),
        python_version=python or _python_version_of(paths),
        notes=tuple(notes),
        conda_channels=tuple(sorted({str(c["channel"]) for c in conda.values() if c["channel"]})),
        complete=True,
        client_side=tuple(
            PackagePin(name, f"=={dists[name].version}", root=False) for name in sorted(client_side)
        ),
    )


def local_code_here(
    path: Sequence[str] | None = None, cwd: str | os.PathLike[str] | None = None
) -> tuple[tuple[LocalCode, ...], tuple[str, ...]]:
    """The local code of the running environment: editable projects and loose modules.

    It ships whatever ``environment=`` is (a list, a lock file), unless ``local_code=False``:
    the code next to a notebook is the user's, whatever the packages come from.

    Returns
    -------
    tuple
        The local code, and notes on what the loose-module sweep left out.
    """
    spec = inventory_environment(path, cwd=cwd)
    code = tuple(c for c in spec.local_code if c.kind in ("project", "modules"))
    return code, tuple(n for n in spec.notes if n.startswith(LOOSE_NOTE))


#: What the VMs need of dask-rawvm's own dependencies: the Dask scheduler and worker, and the
#: dashboard (distributed serves it only with bokeh).
VM_NEEDS = ("dask", "distributed", "bokeh")


def client_side_only(dists: Mapping[str, _Dist]) -> set[str]:
    """Distributions installed here only because dask-rawvm's client side needs them.

    dask-rawvm depends on the local cloud (moto and its tree), the CLI and the cloud SDKs;
    none of that runs on a VM. What it brings is left out unless something else installed
    needs it, the user asked for it (PEP 376 ``REQUESTED``, as pip records it), or the VMs need
    it (:data:`VM_NEEDS`).
    """
    if AGENT not in dists:
        return set()
    brought = _closure([(AGENT, frozenset())], dists) - {AGENT}
    others: list[tuple[str, frozenset[str]]] = [
        (name, frozenset())
        for name, dist in dists.items()
        if name != AGENT and (name not in brought or dist.requested)
    ]
    others += [(name, frozenset()) for name in VM_NEEDS if name in dists]
    return brought - _closure(others, dists)


@functools.cache
def client_side_here() -> frozenset[str]:
    """:func:`client_side_only` of the running environment (cached: it does not change)."""
    return frozenset(client_side_only(_scan_distributions(sys.path, Path.cwd())))


def _closure(start: Sequence[tuple[str, frozenset[str]]], dists: Mapping[str, _Dist]) -> set[str]:
    """Every installed distribution reachable from ``start`` (name, extras asked for) through
    requirements whose markers hold here."""
    seen: set[tuple[str, frozenset[str]]] = set()
    reached: set[str] = set()
    todo = list(start)
    while todo:
        name, extras = todo.pop()
        dist = dists.get(name)
        if dist is None or (name, extras) in seen:
            continue
        seen.add((name, extras))
        reached.add(name)
        for text in dist.requires:
            try:
                req = Requirement(text)
            except InvalidRequirement:
                continue
            wanted = _extra_of(req)
            if wanted and wanted not in extras:
                continue
            if _marker_true(req.marker, wanted):
                extra_names = frozenset(canonicalize_name(e) for e in req.extras)
                todo.append((canonicalize_name(req.name), extra_names))
    return reached


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
        direct_url=read_json(info / "direct_url.json"),
        installer=read_text(info / "INSTALLER").strip(),
        egg=info.suffix == ".egg-info",
        requested=_requested(info),
    )


def _requested(info: Path) -> bool:
    """PEP 376's REQUESTED marker, where it means something: pip writes it only for what the
    user named, uv for every package it installs (measured: uv 0.13, all 102 of a venv)."""
    installer = read_text(info / "INSTALLER").strip()
    return installer != "uv" and (info / "REQUESTED").is_file()


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
    for line in read_text(file).splitlines():
        line = line.strip()
        if line.startswith("["):
            extra = line.strip("[]").split(":")[0]
        elif line:
            requires.append(f'{line} ; extra == "{extra}"' if extra else line)
    return requires


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
    pins += conda_only_pins(conda, set(dists), notes)
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
            file_url_path(url),
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
        file = file_url_path(url)
        if file.endswith(".whl") and os.path.isfile(file):
            return LocalCode(dist.name, file, "wheel", version=dist.version)
        return (
            f"{dist.name}=={dist.version} was installed from the local archive {file}, which "
            "the VMs cannot fetch; install it from an index, or put the wheel back"
        )
    return PackagePin(dist.name, f"=={dist.version}", "url", url=url)


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
    paths: Sequence[str], cwd: Path, skip_dirs: set[Path], installed: set[str], notes: list[str]
) -> list[LocalCode]:
    """Directories outside the environment holding importable ``.py`` code.

    Only code is swept up (see :func:`loose_module_files`); what is left out is a note and a
    warning naming it.
    """
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
            _, left_out = loose_module_files(directory, modules)
            if left_out:
                note = f"{LOOSE_NOTE} {directory}: " + ", ".join(left_out)
                logger.warning("%s", note)
                notes.append(note)
    return result


#: Prefix of the notes on what the loose-module sweep left out.
LOOSE_NOTE = "not shipped from"
#: Files of loose packages that ship: code (and the PEP 561 marker). Data next to a notebook
#: is the user's to ship (``files=``), not the sweep's.
CODE_SUFFIXES = (".py", ".pyi")
#: A single loose code file over 1 MiB is generated or vendored, not hand-written code.
MAX_LOOSE_FILE = 1 << 20
#: All loose code together: 10 MiB is far beyond any project's hand-written code.
MAX_LOOSE_TOTAL = 10 << 20


def loose_module_files(root: Path, modules: Sequence[str]) -> tuple[list[Path], list[str]]:
    """The files of loose modules that ship, and what was left out (with the reason).

    Parameters
    ----------
    root : Path
        The directory holding the modules.
    modules : sequence of str
        Top-level ``.py`` files and package directories in ``root``.

    Returns
    -------
    tuple
        Files to ship (sorted, deterministic), and ``"path (why)"`` for each file left out.
    """
    files: list[Path] = []
    left_out: list[str] = []
    total = 0
    for module in modules:
        path = root / module
        candidates = [path] if path.is_file() else sorted(package_files(path))
        for file in candidates:
            size = file.stat().st_size
            rel = file.relative_to(root).as_posix()
            if not (file.suffix in CODE_SUFFIXES or file.name == "py.typed"):
                left_out.append(f"{rel} (not code)")
            elif size > MAX_LOOSE_FILE:
                left_out.append(f"{rel} ({size / 2**20:.1f} MiB: over the 1 MiB file cap)")
            elif total + size > MAX_LOOSE_TOTAL:
                left_out.append(f"{rel} (past the 10 MiB cap on loose code)")
            else:
                files.append(file)
                total += size
    return files, left_out


def package_files(directory: Path) -> list[Path]:
    """Every file of a package directory, without bytecode, caches and hidden directories."""
    found = []
    for parent, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if d != "__pycache__" and not d.startswith("."))
        found += [Path(parent) / n for n in names if not n.endswith((".pyc", ".pyo"))]
    return found


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


def agent_code() -> LocalCode:
    """dask-rawvm's VM-side code, as installed here: its own package files, no dependencies."""
    package = Path(__file__).resolve().parents[1]
    try:
        version = metadata.version(AGENT)
    except metadata.PackageNotFoundError:  # run from a source tree without installing
        version = "0"
    return LocalCode(AGENT, str(package.parent), "agent", (package.name,), version)


def installed_distribution(name: str) -> PackagePin | LocalCode | None:
    """How the running environment has ``name``: a pin, local code (editable), or None.

    Used to add what the Dask worker itself needs (``distributed``, ``dask-rawvm``) to an
    environment given as a list or lock file, in the same version as here. dask-rawvm
    itself is always its :func:`agent_code`.
    """
    if canonicalize_name(name) == AGENT:
        return agent_code()
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
