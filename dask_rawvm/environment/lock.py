"""Exact pins for the target: ``uv pip compile`` for another platform, cached by content.

The lock for a (translation, target, index configuration) is computed once and stored under
the cache directory by the sha256 of those inputs: a second start with unchanged inputs reads
the stored lock and runs no resolver at all (``Lock.from_cache``).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import unquote

from packaging.utils import canonicalize_name, parse_sdist_filename, parse_wheel_filename

from dask_rawvm.environment.readers import file_url_path
from dask_rawvm.environment.spec import IndexConfig, LocalCode, redact_url
from dask_rawvm.environment.target import Target, wheel_fits_target
from dask_rawvm.environment.translate import (
    EnvironmentTranslationError,
    Problem,
    Translation,
)

Resolver = Literal["uv", "pip-tools"]

#: Bumped when the stored lock's layout or meaning changes, so old entries are not reused.
LOCK_FORMAT = 2
#: Resolver attempts before giving up: each failed attempt names one package to fix (a
#: wheel to bring from this machine, a dependency to relax, a source build to allow).
_MAX_ATTEMPTS = 40
_RESOLVE_TIMEOUT = 900.0


class EnvironmentLockError(EnvironmentTranslationError):
    """The resolver found no installable set of wheels for the target."""


@dataclass(frozen=True)
class Lock:
    """Exact pins for one target.

    Parameters
    ----------
    target : Target
    requirements_txt : str
        What the VM installs with ``uv pip sync``: ``name==version`` lines, no index options
        (those reach the VM's install step only, see :attr:`index`).
    pins : tuple of str
        The requirement lines alone (``name==version`` or ``name @ url``), sorted.
    key : str
        sha256 of the inputs; the cache entry's name.
    path : Path
        The stored ``requirements.txt``.
    from_cache : bool
        True when read from the cache: no resolver ran.
    resolver : {"uv", "pip-tools"}
    sdists : tuple of str
        Packages with no wheel for the target, allowed as source because they were checked to
        be pure Python (the VM builds them; no compiler needed).
    local_code : tuple of LocalCode
        Local code to ship as wheels next to the pins.
    notes : tuple of str
        What the resolver step said worth reporting.
    index : IndexConfig
        What the VMs install from: the user's ``http(s)`` indexes (credentials included: see
        :meth:`~dask_rawvm.environment.spec.IndexConfig.install_environment`).
    links : tuple of Path
        Wheels of pinned packages that only this machine's indexes or find-links have: they
        travel in the bundle (``links/``), since no VM can read this machine's disk.
    """

    target: Target
    requirements_txt: str
    pins: tuple[str, ...]
    key: str
    path: Path
    from_cache: bool
    resolver: Resolver
    sdists: tuple[str, ...] = ()
    local_code: tuple[LocalCode, ...] = ()
    notes: tuple[str, ...] = ()
    index: IndexConfig = field(default_factory=IndexConfig)
    links: tuple[Path, ...] = ()

    def versions(self) -> dict[str, str]:
        """Canonical name -> pinned version (URL pins are left out)."""
        result: dict[str, str] = {}
        for line in self.pins:
            name, sep, version = line.partition("==")
            if sep:
                result[canonicalize_name(name.split("[")[0])] = version.split(";")[0].strip()
        return result


# --------------------------------------------------------------------------------------------
# Paths and tools
# --------------------------------------------------------------------------------------------


def default_cache_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The dask-rawvm cache root: the argument, else ``$DASK_RAWVM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/dask-rawvm`` (``~/.cache/dask-rawvm``).

    Locks live in ``<root>/locks``, local wheels in ``<root>/wheels``, bundles in
    ``<root>/bundles``.
    """
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("DASK_RAWVM_CACHE_DIR"):
        return Path(os.environ["DASK_RAWVM_CACHE_DIR"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "dask-rawvm"


def uv_binary() -> str:
    """The uv executable shipped by the ``uv`` Python package (not whatever is on PATH)."""
    from uv import find_uv_bin

    return str(find_uv_bin())


def uv_environment() -> dict[str, str]:
    """``os.environ`` without uv settings that would change a resolution behind the cache key
    (the index settings were read into the key already; the cache location is kept)."""
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("UV_") or k in ("UV_CACHE_DIR", "UV_OFFLINE", "UV_NATIVE_TLS")
    }


# --------------------------------------------------------------------------------------------
# Locking
# --------------------------------------------------------------------------------------------


def lock_environment(
    translation: Translation,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    resolver: Resolver = "uv",
    refresh: bool = False,
) -> Lock:
    """Lock a translated environment for its target, or read the lock from the cache.

    Parameters
    ----------
    translation : Translation
        From :func:`~dask_rawvm.environment.translate.translate_environment`.
    cache_dir : path-like, optional
        Cache root (see :func:`default_cache_dir`).
    resolver : {"uv", "pip-tools"}
        ``uv pip compile --python-platform ... --only-binary :all:`` (default). pip-tools
        resolves for this machine only, so it is accepted only when the target is this
        machine's platform.
    refresh : bool
        Resolve again even if a cached lock exists.

    Returns
    -------
    Lock

    Raises
    ------
    EnvironmentLockError
        Some package has no wheel (nor pure-Python source) for the target, or the
        requirements conflict; the message names each package and the fix.
    """
    target = translation.target
    _check_resolver(resolver, target)
    key = lock_key(translation, resolver)
    store = default_cache_dir(cache_dir) / "locks"
    if not refresh:
        cached = _read_cached(store, key, translation)
        if cached is not None:
            return cached
    with tempfile.TemporaryDirectory(prefix="rawvm-lock-") as tmp:
        if resolver == "pip-tools":
            resolved = _pip_tools_compile(translation, Path(tmp))
        else:
            resolved = _uv_compile(translation, Path(tmp))
        _check_builds(resolved.body, target)
        return _store(store, key, translation, resolver, resolved)


def lock_key(translation: Translation, resolver: Resolver = "uv") -> str:
    """sha256 over everything that decides the lock's content."""
    inputs = {
        "format": LOCK_FORMAT,
        "resolver": resolver,
        "target": translation.target.as_dict(),
        "python": _lock_python_version(translation.target),
        "requirements": list(translation.requirements),
        "constraints": list(translation.constraints),
        "dependencies": list(translation.dependencies),
        "index": translation.index.cache_key(),
        "local": [_local_fingerprint(code) for code in _resolvable_local(translation)],
    }
    blob = json.dumps(inputs, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


def _check_resolver(resolver: str, target: Target) -> None:
    if resolver == "uv":
        return
    if resolver != "pip-tools":
        raise ValueError(f"resolver must be 'uv' or 'pip-tools', not {resolver!r}")
    local = Target.local()
    if not target.same_platform(local):
        raise EnvironmentLockError(
            [
                Problem(
                    "pip-tools",
                    f"pip-compile resolves for this machine ({local.describe()}) only and "
                    f"would silently ignore the target {target.describe()}",
                    "use resolver='uv' (the default), which resolves for any platform",
                )
            ],
            target,
        )


def _resolvable_local(translation: Translation) -> list[LocalCode]:
    # When the environment was inventoried, local code's dependencies are roots already.
    # From a requirements list or lock file they are unknown: the resolver reads them from
    # the project's metadata (pyproject.toml) or wheel.
    if translation.spec.origin == "local":
        return []
    return [c for c in translation.local_code if c.kind in ("project", "wheel") and c.path]


def _local_fingerprint(code: LocalCode) -> dict[str, str]:
    digest = hashlib.sha256()
    path = Path(code.path)
    files = (
        [path]
        if path.is_file()
        else [path / n for n in ("pyproject.toml", "setup.cfg", "setup.py")]
    )
    for file in files:
        if file.is_file():
            digest.update(file.name.encode() + b"\0" + file.read_bytes())
    return {"name": code.name, "path": code.path, "sha256": digest.hexdigest()}


def _read_cached(store: Path, key: str, translation: Translation) -> Lock | None:
    meta = _read_meta(store / f"{key}.json")
    text_file = store / f"{key}.txt"
    if meta is None or meta.get("format") != LOCK_FORMAT or not text_file.is_file():
        return None
    links = tuple(store / f"{key}.links" / name for name in meta["links"])
    if not all(link.is_file() for link in links):
        return None
    return Lock(
        target=translation.target,
        requirements_txt=text_file.read_text(encoding="utf-8"),
        pins=tuple(meta["pins"]),
        key=key,
        path=text_file,
        from_cache=True,
        resolver=meta["resolver"],
        sdists=tuple(meta["sdists"]),
        local_code=translation.local_code,
        notes=tuple(meta["notes"]),
        index=translation.index.remote(),
        links=links,
    )


def _read_meta(file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


@dataclass
class _Resolved:
    """What a resolver run produced."""

    body: str
    sdists: list[str]
    notes: list[str]
    links: list[Path]  # wheels from this machine's indexes, copied out of them


def _store(
    store: Path, key: str, translation: Translation, resolver: Resolver, resolved: _Resolved
) -> Lock:
    pins = tuple(sorted(_pin_lines(resolved.body)))
    text = _requirements_text(pins)
    store.mkdir(parents=True, exist_ok=True)
    pinned = {(_req_name(p), p.partition("==")[2].split(";")[0].strip()) for p in pins}
    kept = [w for w in resolved.links if _archive_name_version(w) in pinned]
    links_dir = store / f"{key}.links"
    links_dir.mkdir(exist_ok=True)
    for wheel in kept:
        shutil.copyfile(wheel, links_dir / wheel.name)
    text_file = store / f"{key}.txt"
    _atomic_write(text_file, text)
    meta = {
        "format": LOCK_FORMAT,
        "resolver": resolver,
        "target": translation.target.as_dict(),
        "pins": list(pins),
        "sdists": list(resolved.sdists),
        "notes": list(resolved.notes),
        "links": sorted(w.name for w in kept),
    }
    links = [links_dir / name for name in sorted(w.name for w in kept)]
    # The metadata is written last: its presence marks a complete entry.
    _atomic_write(store / f"{key}.json", json.dumps(meta, indent=1, sort_keys=True))
    return Lock(
        translation.target,
        text,
        pins,
        key,
        text_file,
        False,
        resolver,
        tuple(resolved.sdists),
        translation.local_code,
        tuple(resolved.notes),
        translation.index.remote(),
        tuple(links),
    )


def _atomic_write(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def _requirements_text(pins: Sequence[str]) -> str:
    header = "# Generated by dask-rawvm: exact pins for the VMs (install with `uv pip sync`)."
    return "\n".join([header, *pins]) + "\n"


def _check_builds(body: str, target: Target) -> None:
    """CUDA means CUDA: a lock for a GPU target pinning a CPU build is an error."""
    if target.accelerator != "cuda":
        return
    cpu = [p for p in _pin_lines(body) if re.search(r"==[^;\s]*\+cpu\b", p)]
    if cpu:
        raise EnvironmentLockError(
            [
                Problem(
                    _req_name(pin),
                    f"{pin} is a CPU build, but the VMs are {target.describe()}",
                    f"pin a CUDA build of {_req_name(pin)} (or its plain version, PyPI's Linux "
                    "wheels being CUDA builds), or use CPU instance types",
                )
                for pin in cpu
            ],
            target,
        )


def _pin_lines(body: str) -> list[str]:
    lines = []
    for raw in body.splitlines():
        line = raw.strip()
        if line and not line.startswith(("#", "-")):
            lines.append(line.split(" #", 1)[0].strip())
    return lines


# --------------------------------------------------------------------------------------------
# uv
# --------------------------------------------------------------------------------------------

_NO_WHEEL = re.compile(
    r"(?<![\w.-])(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?"
    r"(?:==(?P<version>[^\s,]+))? has no (?:usable wheels|source distribution|"
    r"wheels with a matching (?:platform|Python ABI|Python implementation|Python version)? ?tag)"
)


@dataclass
class _Inputs:
    """What the next resolver run is given; each failed run changes one thing here."""

    requirements: list[str]
    constraints: list[str]
    sdists: set[str]  # packages allowed from source (then checked to be pure Python)
    dependencies: set[str]  # requirements that may become constraints (see Translation)
    links: Path  # wheels brought from this machine's indexes
    notes: list[str]

    def pin_of(self, name: str) -> str | None:
        return next((r for r in self.requirements + self.constraints if _req_name(r) == name), None)

    def replace(self, name: str, line: str | None, *, as_constraint: bool = False) -> None:
        """Put ``line`` in place of ``name``'s pin (None: remove it)."""
        self.requirements = [r for r in self.requirements if _req_name(r) != name]
        self.constraints = [r for r in self.constraints if _req_name(r) != name or "!=" in r]
        if line is not None:
            (self.constraints if as_constraint else self.requirements).append(line)


def _uv_compile(translation: Translation, tmp: Path) -> _Resolved:
    """Resolve for the target against what a VM can reach: the user's ``http(s)`` indexes.

    A pinned package only this machine's indexes or find-links have is brought along (its
    wheel travels in the bundle); a dependency with no wheel for the target is left to the
    resolver; a source-only package is allowed when its build is pure Python.
    """
    links = tmp / "links"
    links.mkdir()
    inputs = _Inputs(
        list(translation.requirements),
        list(translation.constraints),
        set(),
        set(translation.dependencies),
        links,
        [],
    )
    local = _resolvable_local(translation)
    target = translation.target
    remote = translation.index.remote()
    if remote.no_index and not remote.find_links:
        # Nothing a VM could reach: every package travels from this machine's locations.
        _link_wheels(
            local_distributions(None, None, translation.index.local_locations()), target, links
        )
    problems: list[Problem] = []
    for _ in range(_MAX_ATTEMPTS):
        result = _run_uv_compile(translation, inputs, local, tmp)
        if result.returncode != 0:
            if not _next_attempt(result.stderr, inputs, problems, translation):
                raise EnvironmentLockError(problems, target, _uv_detail(result.stderr))
            continue
        compiled = _check_pure(sorted(inputs.sdists), result.stdout, translation, inputs, tmp)
        if compiled and all(_relax(name, inputs) for name in compiled):
            continue  # dependencies whose source would need a compiler: left to the resolver
        problems += [_compiled_problem(name, reason, target) for name, reason in compiled.items()]
        break
    else:
        raise EnvironmentLockError(problems, target, _uv_detail(result.stderr))
    if problems:
        raise EnvironmentLockError(problems, target)
    pinned = {_req_name(p) for p in _pin_lines(result.stdout)}
    inputs.notes += [
        f"{name}: no wheel for {target.python_platform}; its source is pure Python, so the VM "
        "builds it (no compiler needed)"
        for name in sorted(inputs.sdists & pinned)
    ]
    return _Resolved(
        result.stdout, sorted(inputs.sdists & pinned), inputs.notes, sorted(links.iterdir())
    )


def _resolution_index(translation: Translation, links: Path) -> IndexConfig:
    """The user's indexes a VM can reach, plus the wheels brought from this machine's."""
    remote = translation.index.remote()
    if not any(links.iterdir()):
        return remote
    return remote.merged(IndexConfig(find_links=(str(links),)))


def _run_uv_compile(
    translation: Translation, inputs: _Inputs, local: Sequence[LocalCode], tmp: Path
) -> subprocess.CompletedProcess[str]:
    target = translation.target
    req_file, con_file = tmp / "requirements.in", tmp / "constraints.txt"
    local_lines = [f"{c.name} @ {Path(c.path).as_uri()}" for c in local]
    req_file.write_text("\n".join(inputs.requirements + local_lines) + "\n", encoding="utf-8")
    con_file.write_text("\n".join(inputs.constraints) + "\n", encoding="utf-8")
    cmd = [
        uv_binary(),
        "pip",
        "compile",
        str(req_file),
        "--constraint",
        str(con_file),
        "--python-platform",
        target.python_platform,
        "--python-version",
        _lock_python_version(target),
        "--python",
        sys.executable,
        "--only-binary",
        ":all:",
        "--no-config",
        "--no-header",
        "--quiet",
        "--color",
        "never",
        *_resolution_index(translation, inputs.links).uv_args(),
    ]
    for name in sorted(inputs.sdists):
        cmd += ["--no-binary", name]
    for code in local:
        cmd += ["--no-emit-package", code.name]
    return subprocess.run(
        cmd,
        capture_output=True,
        text=True,
        env=uv_environment(),
        timeout=_RESOLVE_TIMEOUT,
        check=False,
    )


_NO_VERSION = re.compile(
    r"there (?:is|are) no versions? of (?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?"
    r"(?:==(?P<version>[^\s,]+))?"
)
_NOT_FOUND = re.compile(
    r"(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?(?:==(?P<version>[^\s,]+))? was not "
    r"found in the (?:provided package locations|package registry)"
)


def _next_attempt(
    stderr: str, inputs: _Inputs, problems: list[Problem], translation: Translation
) -> bool:
    """Adjust the inputs after a failed resolution; False when nothing more can be tried.

    In order: bring the package's wheel from this machine's indexes; allow its source (then
    checked to be pure Python); fall back from a build label (``+cpu``) no index has to the
    public build of the same version; leave a dependency to the resolver. Else it is a
    problem, named with the fix.
    """
    target = translation.target
    no_wheel = _NO_WHEEL.search(stderr)
    match = no_wheel or _NO_VERSION.search(stderr) or _NOT_FOUND.search(stderr)
    if match is None:
        problems.append(
            Problem(
                "(resolution)",
                "no set of versions satisfies the requirements for this target",
                "see the resolver output below; pin other versions or use environment_ignore",
            )
        )
        return False
    name = canonicalize_name(match["name"])
    pin = inputs.pin_of(name)
    if _bring_local_distributions(name, pin, translation, inputs):
        return True
    if no_wheel is not None and name not in inputs.sdists:
        inputs.sdists.add(name)  # retry allowing its source, then check it is pure Python
        return True
    if pin is not None and _public_build(name, pin, inputs):
        return True
    if _relax(name, inputs):
        return True
    version = f"=={match['version']}" if match["version"] else ""
    # Known here only in builds for another platform: say so, not "not on the indexes".
    elsewhere = local_distributions(name, _pinned_version(pin), translation.index.local_locations())
    missing_build = no_wheel is not None or bool(elsewhere)
    version = version or (f"=={_pinned_version(pin)}" if _pinned_version(pin) else "")
    what = "has no wheel (nor source distribution)" if missing_build else "is not on the indexes"
    reason = f"{name}{version} {what} for {target.describe()}"
    parent = re.search(rf"(\S+?)(==\S+)? depends on {re.escape(match['name'])}\b", stderr)
    if parent:
        reason += f" (needed by {parent.group(1)})"
    problems.append(Problem(name, reason, _fix(name, target)))
    before = len(inputs.requirements) + len(inputs.constraints)
    inputs.replace(name, None)
    # A dependency (not one of our inputs) cannot be left out here: stop and report.
    return before != len(inputs.requirements) + len(inputs.constraints)


def _bring_local_distributions(
    name: str, pin: str | None, translation: Translation, inputs: _Inputs
) -> bool:
    """Copy the target's wheels of ``pin`` from this machine's indexes; True if any is new."""
    version = _pinned_version(pin)
    brought = _link_wheels(
        local_distributions(name, version, translation.index.local_locations()),
        translation.target,
        inputs.links,
    )
    inputs.notes += [
        f"{w.name}: only on this machine ({w.parent}); travels in the bundle" for w in brought
    ]
    return bool(brought)


def _pinned_version(pin: str | None) -> str | None:
    """The exact version of a ``name==version`` pin, else None."""
    return pin.partition("==")[2].split(";")[0].strip() if pin and "==" in pin else None


def _link_wheels(wheels: Sequence[Path], target: Target, links: Path) -> list[Path]:
    """Link the wheels that fit ``target`` into ``links`` (the resolver's find-links);
    return those that were not there yet. Links, not copies: only what ends up pinned is
    copied, into the lock's cache entry."""
    new = []
    for wheel in wheels:
        destination = links / wheel.name
        fits = not wheel.name.endswith(".whl") or wheel_fits_target(wheel, target)
        if fits and not destination.exists():
            destination.symlink_to(wheel)
            new.append(wheel)
    return new


def _public_build(name: str, pin: str, inputs: _Inputs) -> bool:
    """``torch==2.13.0+cpu`` that no index has for the target -> ``torch==2.13.0``."""
    found = re.search(r"==([^+;\s]+)\+([\w.]+)", pin)
    if found is None:
        return False
    public = f"{name}=={found.group(1)}"
    inputs.replace(name, public, as_constraint=pin in inputs.constraints)
    inputs.notes.append(
        f"{pin}: that build is not available for the target; the public build of the same "
        f"version ({public}) is used"
    )
    return True


def _relax(name: str, inputs: _Inputs) -> bool:
    """A dependency the target cannot have as installed here: same version where needed."""
    pin = inputs.pin_of(name)
    if name not in inputs.dependencies or pin is None or pin not in inputs.requirements:
        return False
    inputs.replace(name, pin, as_constraint=True)
    inputs.sdists.discard(name)
    inputs.notes.append(
        f"{pin}: installed here as a dependency, but no installable build for the target; "
        "left to the resolver (the same version wherever a package needs it)"
    )
    return True


def local_distributions(
    name: str | None, version: str | None, locations: Sequence[str]
) -> list[Path]:
    """Wheels and source archives in find-links directories and ``file://`` simple indexes
    of this machine.

    Parameters
    ----------
    name : str, optional
        Only this package's wheels (every package's when None).
    version : str, optional
        Only this version's.
    locations : sequence of str
        Find-links directories and simple index roots (paths or ``file:`` URLs).
    """
    stem = canonicalize_name(name).replace("-", "_") if name else None
    candidates: list[Path] = []
    for location in locations:
        directory = Path(file_url_path(location))
        if not directory.is_dir():
            continue
        for suffix in _ARCHIVES:  # a find-links directory: the files themselves
            candidates += directory.glob(f"{stem or '*'}-*{suffix}")
        page_dir = canonicalize_name(name) if name else "*"
        for page in directory.glob(f"{page_dir}/index.html"):  # a PEP 503 simple index
            html = page.read_text(encoding="utf-8", errors="replace")
            hrefs = re.findall(r'href="([^"#]+)', html)
            candidates += [(page.parent / unquote(h)).resolve() for h in hrefs]
    found = []
    for archive in candidates:
        identity = _archive_name_version(archive)
        if identity is None or not archive.is_file():
            continue
        found_name, found_version = identity
        if stem is not None and found_name.replace("-", "_") != stem:
            continue
        if version is None or found_version == version:
            found.append(archive)
    return sorted(set(found))


_ARCHIVES = (".whl", ".tar.gz", ".zip")


def _archive_name_version(archive: Path) -> tuple[str, str] | None:
    """Canonical name and version of a wheel or source archive, from its file name."""
    try:
        if archive.name.endswith(".whl"):
            name, version, _, _ = parse_wheel_filename(archive.name)
        elif archive.name.endswith(_ARCHIVES):
            name, version = parse_sdist_filename(archive.name)
        else:
            return None
    except ValueError:
        return None
    return canonicalize_name(name), str(version)


def _fix(name: str, target: Target) -> str:
    other = "an x86_64 instance type (arm=False)" if target.arch == "aarch64" else "another target"
    return (
        f"pin a version of {name} that publishes {target.arch} wheels, "
        f"environment_ignore=[{name!r}] if the workers do not import it, or {other}"
    )


def _req_name(requirement: str) -> str:
    return canonicalize_name(re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0])


def _uv_detail(stderr: str) -> str:
    text = re.sub(r"[a-z][a-z0-9+.-]*://[^\s`'\"]+", lambda m: redact_url(m.group(0)), stderr)
    return "resolver output:\n" + "\n".join("    " + line for line in text.strip().splitlines())


def _check_pure(
    names: Sequence[str], body: str, translation: Translation, inputs: _Inputs, tmp: Path
) -> dict[str, str]:
    """Build each source-only package here; those whose wheel is not pure Python, and why."""
    pinned = {_req_name(p): p for p in _pin_lines(body)}
    compiled: dict[str, str] = {}
    for name in names:
        if name not in pinned:
            continue
        index = _resolution_index(translation, inputs.links)
        tags = _build_tags(pinned[name], index, tmp / name)
        if tags and all(t.endswith("-none-any") for t in tags):
            continue
        what = f"builds a compiled extension ({', '.join(tags)})" if tags else "does not build"
        compiled[name] = (
            f"{pinned[name]} has no wheel for {translation.target.describe()} and its source "
            f"{what}: the VMs would need a compiler"
        )
    return compiled


def _compiled_problem(name: str, reason: str, target: Target) -> Problem:
    return Problem(name, reason, _fix(name, target))


def _build_tags(requirement: str, index: IndexConfig, out: Path) -> list[str]:
    cmd = [
        uv_binary(),
        "pip",
        "install",
        "--no-config",
        "--no-deps",
        "--quiet",
        "--target",
        str(out),
        "--python",
        sys.executable,
        "--no-binary",
        _req_name(requirement),
        *index.uv_args(),
        requirement,
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env=uv_environment(), check=False, timeout=600
    )
    if done.returncode != 0:
        return []
    tags = []
    for wheel_file in out.glob("*.dist-info/WHEEL"):
        tags += [
            line.split(":", 1)[1].strip()
            for line in wheel_file.read_text(encoding="utf-8").splitlines()
            if line.startswith("Tag:")
        ]
    return tags


# --------------------------------------------------------------------------------------------
# pip-tools (this machine only)
# --------------------------------------------------------------------------------------------


def _pip_tools_compile(translation: Translation, tmp: Path) -> _Resolved:
    req_file, out = tmp / "requirements.in", tmp / "requirements.txt"
    con_file = tmp / "constraints.txt"
    con_file.write_text("\n".join(translation.constraints) + "\n", encoding="utf-8")
    lines = [*translation.requirements, f"-c {con_file}"]
    req_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "piptools",
        "compile",
        "--quiet",
        "--no-header",
        "--output-file",
        str(out),
        str(req_file),
        *_pip_index_args(translation.index),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, check=False, timeout=_RESOLVE_TIMEOUT
    )
    if done.returncode != 0:
        missing = "No module named piptools" in done.stderr
        reason = "pip-tools is not installed" if missing else "pip-compile failed"
        fix = "pip install pip-tools, or use resolver='uv'" if missing else "see below"
        raise EnvironmentLockError(
            [Problem("pip-tools", reason, fix)], translation.target, _uv_detail(done.stderr)
        )
    notes = ["resolved by pip-compile for this machine"]
    return _Resolved(out.read_text(encoding="utf-8"), [], notes, [])


def _pip_index_args(index: IndexConfig) -> list[str]:
    return [arg for arg in index.uv_args()]


def read_lock_metadata(lock: Lock) -> Mapping[str, object]:
    """The stored metadata of a lock (pins, resolver, notes), for reports."""
    return _read_meta(lock.path.with_suffix(".json")) or {}


def _lock_python_version(target: Target) -> str:
    """The Python version uv locks for: this interpreter's own ``X.Y.Z`` when the target
    runs its ``X.Y`` (the VMs then run this minor, see ``bootstrap``), else ``X.Y``.

    uv reads ``--python-version 3.11`` as 3.11.0, so a distribution installed here that
    requires a later patch (soupsieve 4.1.3: ``>=3.11.5``, beside pydata-sphinx-theme) made
    the lock of an environment that works here fail.
    """
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if target.python_version == here:
        return f"{here}.{sys.version_info.micro}"
    return target.python_version
