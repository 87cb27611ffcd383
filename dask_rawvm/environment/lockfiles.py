"""Lock files users already have: ``requirements.txt`` (pip-compile, uv), ``uv.lock``,
``conda-lock.yml``."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from dask_rawvm.environment.conda_meta import (
    CONDA_RUNTIME,
    CONDA_TO_PYPI,
    conda_to_pypi,
    is_conda_runtime,
)
from dask_rawvm.environment.indexes import read_index_config
from dask_rawvm.environment.readers import file_url_path, read_text
from dask_rawvm.environment.spec import (
    EnvironmentSpec,
    EnvironmentSpecError,
    IndexConfig,
    LocalCode,
    LocalKind,
    PackagePin,
    Source,
    unique,
)

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

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
            path = (self.base_dir / file_url_path(line.split()[0])).resolve()
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
            name = tomllib.loads(read_text(pyproject)).get("project", {}).get("name")
        except tomllib.TOMLDecodeError:
            name = None
        if name:
            return canonicalize_name(name)
    setup_cfg = read_text(path / "setup.cfg")
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
        index=read_index_config().merged(IndexConfig(extra_index_urls=unique(indexes))),
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


