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
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from packaging.utils import canonicalize_name

from dask_rawvm.environment.spec import IndexConfig, LocalCode, redact_url
from dask_rawvm.environment.target import Target
from dask_rawvm.environment.translate import (
    EnvironmentTranslationError,
    Problem,
    Translation,
)

Resolver = Literal["uv", "pip-tools"]

#: Bumped when the stored lock's layout or meaning changes, so old entries are not reused.
LOCK_FORMAT = 1
#: Resolver attempts before giving up: each failed attempt names one package to fix.
_MAX_ATTEMPTS = 12
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
        What the VM installs with ``uv pip sync``: index options, then ``name==version`` lines.
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
    index_strategy : str, optional
        uv ``--index-strategy`` the VM must install with (``unsafe-best-match`` for pip-style
        index configurations).
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
    index_strategy: str | None = None

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
            body, sdists, notes = _pip_tools_compile(translation, Path(tmp))
        else:
            body, sdists, notes = _uv_compile(translation, Path(tmp))
    return _store(store, key, translation, resolver, body, sdists, notes)


def lock_key(translation: Translation, resolver: Resolver = "uv") -> str:
    """sha256 over everything that decides the lock's content."""
    inputs = {
        "format": LOCK_FORMAT,
        "resolver": resolver,
        "target": translation.target.as_dict(),
        "requirements": list(translation.requirements),
        "constraints": list(translation.constraints),
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
        index_strategy=_strategy(translation.index),
    )


def _strategy(index: IndexConfig) -> str | None:
    args = index.uv_args()
    return args[args.index("--index-strategy") + 1] if "--index-strategy" in args else None


def _read_meta(file: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _store(
    store: Path,
    key: str,
    translation: Translation,
    resolver: Resolver,
    body: str,
    sdists: Sequence[str],
    notes: Sequence[str],
) -> Lock:
    pins = tuple(sorted(_pin_lines(body)))
    text = _requirements_text(translation.index, pins)
    store.mkdir(parents=True, exist_ok=True)
    text_file = store / f"{key}.txt"
    _atomic_write(text_file, text)
    meta = {
        "format": LOCK_FORMAT,
        "resolver": resolver,
        "target": translation.target.as_dict(),
        "pins": list(pins),
        "sdists": list(sdists),
        "notes": list(notes),
    }
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
        tuple(sdists),
        translation.local_code,
        tuple(notes),
        _strategy(translation.index),
    )


def _atomic_write(file: Path, text: str) -> None:
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, file)


def _requirements_text(index: IndexConfig, pins: Sequence[str]) -> str:
    header = [
        "# Generated by dask-rawvm: exact pins for the VMs (install with `uv pip sync`).",
        *index.requirement_lines(),
    ]
    return "\n".join([*header, *pins]) + "\n"


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
    requirements: list[str]
    constraints: list[str]
    sdists: set[str]


def _uv_compile(translation: Translation, tmp: Path) -> tuple[str, list[str], list[str]]:
    inputs = _Inputs(list(translation.requirements), list(translation.constraints), set())
    local = _resolvable_local(translation)
    notes: list[str] = []
    problems: list[Problem] = []
    for _ in range(_MAX_ATTEMPTS):
        result = _run_uv_compile(translation, inputs, local, tmp)
        if result.returncode == 0:
            break
        if not _next_attempt(result.stderr, inputs, problems, translation.target):
            raise EnvironmentLockError(problems, translation.target, _uv_detail(result.stderr))
    else:
        raise EnvironmentLockError(problems, translation.target, _uv_detail(result.stderr))
    if problems:
        raise EnvironmentLockError(problems, translation.target)
    body = result.stdout
    sdists = _check_pure(sorted(inputs.sdists), body, translation, tmp, problems)
    if problems:
        raise EnvironmentLockError(problems, translation.target)
    notes += [
        f"{name}: no wheel for {translation.target.python_platform}; its source is pure "
        "Python, so the VM builds it (no compiler needed)"
        for name in sdists
    ]
    return body, sdists, notes


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
        target.python_version,
        "--python",
        sys.executable,
        "--only-binary",
        ":all:",
        "--no-config",
        "--no-header",
        "--quiet",
        "--color",
        "never",
        *translation.index.uv_args(),
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


def _next_attempt(stderr: str, inputs: _Inputs, problems: list[Problem], target: Target) -> bool:
    """Adjust the inputs after a failed resolution; False when nothing more can be tried."""
    no_wheel, no_version = _NO_WHEEL.search(stderr), _NO_VERSION.search(stderr)
    match = no_wheel or no_version
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
    if no_wheel is not None and name not in inputs.sdists:
        inputs.sdists.add(name)  # retry allowing its source, then check it is pure Python
        return True
    version = f"=={match['version']}" if match["version"] else ""
    what = "has no wheel (nor source distribution)" if no_wheel else "is not on the indexes"
    reason = f"{name}{version} {what} for {target.describe()}"
    parent = re.search(rf"(\S+?)(==\S+)? depends on {re.escape(match['name'])}\b", stderr)
    if parent:
        reason += f" (needed by {parent.group(1)})"
    problems.append(Problem(name, reason, _fix(name, target)))
    before = len(inputs.requirements) + len(inputs.constraints)
    inputs.requirements = [r for r in inputs.requirements if _req_name(r) != name]
    inputs.constraints = [r for r in inputs.constraints if _req_name(r) != name]
    # A dependency (not one of our inputs) cannot be left out here: stop and report.
    return before != len(inputs.requirements) + len(inputs.constraints)


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
    names: Sequence[str],
    body: str,
    translation: Translation,
    tmp: Path,
    problems: list[Problem],
) -> list[str]:
    """Build each source-only package here and keep it only if the wheel is pure Python."""
    pinned = {_req_name(p): p for p in _pin_lines(body)}
    allowed = []
    for name in names:
        if name not in pinned:
            continue
        tags = _build_tags(pinned[name], translation.index, tmp / name)
        if tags and all(t.endswith("-none-any") for t in tags):
            allowed.append(name)
            continue
        what = f"builds a compiled extension ({', '.join(tags)})" if tags else "does not build"
        problems.append(
            Problem(
                name,
                f"{pinned[name]} has no wheel for {translation.target.describe()} and its source "
                f"{what}: the VMs would need a compiler",
                _fix(name, translation.target),
            )
        )
    return allowed


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


def _pip_tools_compile(translation: Translation, tmp: Path) -> tuple[str, list[str], list[str]]:
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
    return out.read_text(encoding="utf-8"), [], ["resolved by pip-compile for this machine"]


def _pip_index_args(index: IndexConfig) -> list[str]:
    return [arg for arg in index.uv_args()]


def read_lock_metadata(lock: Lock) -> Mapping[str, object]:
    """The stored metadata of a lock (pins, resolver, notes), for reports."""
    return _read_meta(lock.path.with_suffix(".json")) or {}
