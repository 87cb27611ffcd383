"""The bundle a VM installs: lock + locally built wheels + manifest, content-addressed.

Layout of a bundle directory (and of its ``.tar.gz``)::

    manifest.json      target, Python, sha256 of every file below
    python-version     "3.11.7" (or "3.11" for another minor), read by the install script
    setup.sh           the environment step of the VM's boot (:func:`setup_script`)
    requirements.txt   exact pins (``uv pip sync``), no index options
    links/*.whl        (optional) pinned wheels only this machine's indexes have
    conda/             (optional) conda-only packages: lock, installer, local package files
    wheels/*.whl       local code: dask-rawvm's own, editable projects, loose modules, wheels

The bundle holds no index settings and no credentials: the VM's install step gets the index
settings (:meth:`~dask_rawvm.environment.spec.IndexConfig.install_environment`) in its
environment only, from the cluster's store. Equal environments are equal bundles whoever
builds them.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.utils import canonicalize_name

from dask_rawvm.environment.artifact import (
    ARTIFACT_FORMAT,
    BUILD_WAIT_SECONDS,
    POLL_SECONDS,
    artifact_fetch_script,
    artifact_publish_script,
)
from dask_rawvm.environment.conda import CondaLock, conda_install_script
from dask_rawvm.environment.inventory import loose_module_files, package_files
from dask_rawvm.environment.lock import Lock, default_cache_dir, uv_binary, uv_environment
from dask_rawvm.environment.spec import LocalCode
from dask_rawvm.environment.target import Target, wheel_fits_target
from dask_rawvm.environment.translate import EnvironmentTranslationError, Expected, Problem

#: Bumped when the bundle layout changes.
BUNDLE_FORMAT = 1
#: The bundle's file the boot script sources to set the environment up.
SETUP_SCRIPT = "setup.sh"
#: Directories never part of a local project's content hash (build output, caches, VCS).
_SKIP_DIRS = frozenset(
    {
        ".git",
        ".hg",
        ".svn",
        ".venv",
        "venv",
        "__pycache__",
        "build",
        "dist",
        ".tox",
        ".nox",
        ".mypy_cache",
        ".pytest_cache",
        ".ruff_cache",
        "node_modules",
        ".eggs",
    }
)
#: Timestamp inside generated archives (zip's epoch): equal inputs give equal bytes.
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)


class EnvironmentBundleError(EnvironmentTranslationError):
    """Local code cannot be built for the target (e.g. a compiled package, another arch)."""


@dataclass(frozen=True)
class Bundle:
    """A content-addressed, installable environment.

    Parameters
    ----------
    path : Path
        The bundle directory (``<cache>/bundles/<digest>``).
    digest : str
        sha256 over the manifest, which holds the sha256 of every file: equal contents, equal
        digest, wherever and whenever built.
    target : Target
    manifest : dict
        What ``manifest.json`` holds.
    lock : Lock
    expected : dict
        What a VM should have of each distribution of the source environment (the fidelity
        check's reference; see ``Translation.expected_versions``). Not part of the digest.
    """

    path: Path
    digest: str
    target: Target
    manifest: Mapping[str, object] = field(repr=False)
    lock: Lock = field(repr=False)
    expected: Mapping[str, Expected] = field(default_factory=dict, repr=False)

    @property
    def wheels(self) -> list[Path]:
        """The local wheels shipped in the bundle."""
        return sorted((self.path / "wheels").glob("*.whl"))

    def write_archive(self, path: str | os.PathLike[str]) -> Path:
        """Write the bundle as a reproducible ``.tar.gz`` (same contents, same bytes).

        Parameters
        ----------
        path : path-like
            A file name, or an existing directory (the archive is named
            ``rawvm-env-<digest[:16]>.tar.gz`` there).

        Returns
        -------
        Path
            The archive written.
        """
        out = Path(path)
        if out.is_dir():
            out = out / f"rawvm-env-{self.digest[:16]}.tar.gz"
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for file in _bundle_files(self.path):
                rel = file.relative_to(self.path).as_posix()
                info = tarfile.TarInfo(rel)
                info.size, info.mode, info.mtime = file.stat().st_size, 0o644, 0
                with file.open("rb") as handle:
                    tar.addfile(info, handle)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
        with (
            tmp.open("wb") as raw,
            gzip.GzipFile(filename="", fileobj=raw, mode="wb", mtime=0) as gz,
        ):
            gz.write(buffer.getvalue())
        os.replace(tmp, out)
        return out


def _bundle_files(root: Path) -> list[Path]:
    return sorted((p for p in root.rglob("*") if p.is_file()), key=lambda p: p.as_posix())


# --------------------------------------------------------------------------------------------
# Building
# --------------------------------------------------------------------------------------------


def build_bundle(
    lock: Lock,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    conda: CondaLock | None = None,
) -> Bundle:
    """Build local wheels for the lock's target and assemble the bundle.

    Parameters
    ----------
    lock : Lock
        From :func:`~dask_rawvm.environment.lock.lock_environment`.
    conda : CondaLock, optional
        The environment's conda-only packages (``conda/`` in the bundle).
    cache_dir : path-like, optional
        Cache root (see :func:`~dask_rawvm.environment.lock.default_cache_dir`).

    Returns
    -------
    Bundle

    Raises
    ------
    EnvironmentBundleError
        A local package builds a wheel that does not install on the target (compiled for
        another architecture or Python), or fails to build.
    """
    root = default_cache_dir(cache_dir)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=_mkdir(root / "bundles")))
    try:
        wheels_dir = _mkdir(staging / "wheels")
        problems: list[Problem] = []
        for code in lock.local_code:
            try:
                build_local_wheel(code, lock.target, wheels_dir, cache_dir=root)
            except EnvironmentBundleError as exc:
                problems += exc.problems
        if problems:
            raise EnvironmentBundleError(problems, lock.target)
        (staging / "requirements.txt").write_text(lock.requirements_txt, encoding="utf-8")
        (staging / "python-version").write_text(_vm_python_version(lock.target) + "\n")
        (staging / SETUP_SCRIPT).write_text(setup_script(), encoding="utf-8")
        if lock.links:
            links = _mkdir(staging / "links")
            for wheel in lock.links:
                shutil.copyfile(wheel, links / wheel.name)
        if conda is not None:
            conda.write_into(staging)
        manifest = _manifest(staging, lock)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True))
        digest = _digest(manifest)
        final = root / "bundles" / digest
        try:
            os.replace(staging, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(staging)  # identical content already there (maybe just built)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Bundle(final, digest, lock.target, manifest, lock)


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def _manifest(staging: Path, lock: Lock) -> dict[str, object]:
    files = {
        p.relative_to(staging).as_posix(): _sha256(p)
        for p in _bundle_files(staging)
        if p.name != "manifest.json"
    }
    return {
        "format": BUNDLE_FORMAT,
        "target": lock.target.as_dict(),
        "python_version": lock.target.python_version,
        "python_platform": lock.target.python_platform,
        "lock_key": lock.key,
        "resolver": lock.resolver,
        "sdists": list(lock.sdists),
        "files": files,
    }


def _digest(manifest: Mapping[str, object]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_local_wheel(
    code: LocalCode,
    target: Target,
    out_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Path:
    """Make the wheel of one piece of local code and check it installs on ``target``.

    Parameters
    ----------
    code : LocalCode
        A project (built with ``uv build --wheel``, cached by the source tree's content),
        loose modules (packed into a pure-Python wheel here), or a wheel file (copied).
    target : Target
    out_dir : path-like
        Where the wheel is written.
    cache_dir : path-like, optional
        Cache root for built project wheels.

    Returns
    -------
    Path
        The wheel in ``out_dir``.

    Raises
    ------
    EnvironmentBundleError
        The wheel does not fit the target, or the build failed.
    """
    out = Path(out_dir)
    if code.kind == "modules":
        return modules_wheel(code, out)
    if code.kind == "agent":
        return agent_wheel(code, out)
    if code.kind == "wheel":
        wheel = Path(code.path)
    else:
        wheel = _project_wheel(code, default_cache_dir(cache_dir) / "wheels")
    if not wheel_fits_target(wheel, target):
        reason = (
            f"local package {code.name} builds {wheel.name}, which does not install on "
            f"{target.describe()} (it is compiled for this machine)"
        )
        fix = (
            f"environment_ignore=[{code.name!r}], publish {target.arch} wheels of it to your "
            "index and install it from there, or use instance types of this machine's kind"
        )
        raise EnvironmentBundleError([Problem(code.name, reason, fix)], target)
    destination = out / wheel.name
    shutil.copyfile(wheel, destination)
    return destination


def _project_wheel(code: LocalCode, wheel_cache: Path) -> Path:
    source = Path(code.path)
    cached = wheel_cache / f"{code.name}-{_tree_hash(source)[:24]}"
    found = sorted(cached.glob("*.whl"))
    if found:
        return found[0]
    with tempfile.TemporaryDirectory(prefix="rawvm-wheel-") as tmp:
        done = subprocess.run(
            [
                uv_binary(),
                "build",
                "--wheel",
                "--quiet",
                "--python",
                sys.executable,
                "--out-dir",
                tmp,
                str(source),
            ],
            capture_output=True,
            text=True,
            env=uv_environment(),
            check=False,
            timeout=900,
        )
        built = sorted(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not built:
            tail = "\n".join(done.stderr.strip().splitlines()[-15:])
            raise EnvironmentBundleError(
                [
                    Problem(
                        code.name,
                        f"`uv build --wheel {source}` failed:\n{tail}",
                        "fix the build, or environment_ignore=[...] it",
                    )
                ],
                Target.local(),
            )
        _mkdir(cached)
        final = cached / built[0].name
        shutil.copyfile(built[0], final)
        return final


def _tree_hash(root: Path) -> str:
    """Hash of a source tree's file names, sizes and mtimes (cheap; changes on any edit)."""
    digest = hashlib.sha256(str(root.resolve()).encode())
    for directory, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(files):
            if name.endswith((".pyc", ".so.tmp")):
                continue
            path = os.path.join(directory, name)
            stat = os.stat(path)
            rel = os.path.relpath(path, root)
            digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------
# Wheels
# --------------------------------------------------------------------------------------------


def write_wheel(
    out_dir: str | os.PathLike[str],
    name: str,
    version: str,
    files: Mapping[str, bytes],
    *,
    tag: str = "py3-none-any",
    requires: Sequence[str] = (),
    requires_python: str | None = None,
) -> Path:
    """Write a wheel from in-memory files, reproducibly (sorted entries, fixed timestamps).

    Parameters
    ----------
    out_dir : path-like
        Directory for the ``.whl``.
    name, version : str
        Distribution name and version.
    files : mapping of str to bytes
        Archive path (``pkg/__init__.py``) -> content.
    tag : str
        Wheel tag, ``py3-none-any`` for pure Python.
    requires : sequence of str
        ``Requires-Dist`` entries.
    requires_python : str, optional
        ``Requires-Python``, e.g. ``">=3.11.5"``.

    Returns
    -------
    Path
        The wheel file.
    """
    dist_name = canonicalize_name(name).replace("-", "_")
    info = f"{dist_name}-{version}.dist-info"
    purelib = "true" if tag.endswith("-none-any") else "false"
    metadata = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    metadata += [f"Requires-Dist: {r}" for r in requires]
    if requires_python is not None:
        metadata.append(f"Requires-Python: {requires_python}")
    entries = dict(sorted(files.items()))
    entries[f"{info}/METADATA"] = ("\n".join(metadata) + "\n").encode()
    entries[f"{info}/WHEEL"] = (
        f"Wheel-Version: 1.0\nGenerator: dask-rawvm\nRoot-Is-Purelib: {purelib}\nTag: {tag}\n"
    ).encode()
    record = [f"{path},sha256={_b64_sha256(data)},{len(data)}" for path, data in entries.items()]
    entries[f"{info}/RECORD"] = ("\n".join([*record, f"{info}/RECORD,,"]) + "\n").encode()
    out = Path(out_dir) / f"{dist_name}-{version}-{tag}.whl"
    with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for path, data in entries.items():
            entry = zipfile.ZipInfo(path, date_time=_ZIP_EPOCH)
            entry.external_attr = 0o644 << 16
            entry.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(entry, data)
    return out


def _b64_sha256(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def modules_wheel(code: LocalCode, out_dir: str | os.PathLike[str]) -> Path:
    """Pack loose modules (top-level ``.py`` files and packages of a directory) in a wheel.

    Only their code ships (:func:`~dask_rawvm.environment.inventory.loose_module_files`).
    The version is ``0+<content hash>``: a change in the code is a new wheel, and the VM's
    installer never mistakes an old one for it.
    """
    root = Path(code.path)
    included, _ = loose_module_files(root, code.modules)
    files = {file.relative_to(root).as_posix(): file.read_bytes() for file in included}
    content = hashlib.sha256()
    for path, data in sorted(files.items()):
        content.update(path.encode() + b"\0" + data)
    version = f"0+{content.hexdigest()[:12]}"
    return write_wheel(out_dir, code.name, version, files)


def agent_wheel(code: LocalCode, out_dir: str | os.PathLike[str]) -> Path:
    """dask-rawvm's own package files as a wheel of its installed version, no dependencies.

    Everything of the package ships (its data files too: config defaults, price table);
    its client-side dependencies do not (see ``inventory.client_side_only``).
    """
    root = Path(code.path)
    files = {
        file.relative_to(root).as_posix(): file.read_bytes()
        for module in code.modules
        for file in sorted(package_files(root / module))
    }
    return write_wheel(out_dir, code.name, code.version or "0", files)


# --------------------------------------------------------------------------------------------
# What the VM runs
# --------------------------------------------------------------------------------------------

_PYTHON_SCRIPT = r"""# dask-rawvm: choose the venv's Python (needs RAWVM_BUNDLE); sets
# rawvm_python, or leaves it empty when only a download (uv's managed Python) can give it.
# The client's minor version is required (pickled code and Dask need it): the image's
# interpreter of that minor, preferring the client's exact release; else the distribution's
# package (Amazon Linux 2023 has python3.11 ... python3.14 beside its python3 3.9).
rawvm_python_version=$(cat "$RAWVM_BUNDLE/python-version")
rawvm_minor=$(echo "$rawvm_python_version" | cut -d. -f1,2)
rawvm_python=""
rawvm_version_of() { "$1" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null; }
for rawvm_name in "python$rawvm_minor" python3; do
  rawvm_path=$(command -v "$rawvm_name" 2>/dev/null) || continue
  rawvm_found=$(rawvm_version_of "$rawvm_path") || continue
  if [ "$rawvm_found" = "$rawvm_python_version" ]; then rawvm_python=$rawvm_path; break; fi
  case "$rawvm_found" in "$rawvm_minor".*) rawvm_python=${rawvm_python:-$rawvm_path} ;; esac
done
if [ -z "$rawvm_python" ] && command -v dnf >/dev/null 2>&1 \
    && dnf install -y -q "python$rawvm_minor" >/dev/null 2>&1; then
  rawvm_python=$(command -v "python$rawvm_minor")
fi
rawvm_python_chosen=1
"""

_UV_FUNCTION = r"""# uv: the one the cluster stored for this VM (RAWVM_UV, fetched by the
# boot script), else the image's. No pip: Amazon Linux 2023 ships none.
if [ -n "${RAWVM_UV:-}" ]; then
  rawvm_uv() { "$RAWVM_UV" "$@"; }
else
  rawvm_uv() { uv "$@"; }
fi
"""

_INSTALL_SCRIPT = r"""# dask-rawvm: install the environment bundle (needs RAWVM_BUNDLE, RAWVM_VENV)
# rawvm_uv is defined outside the install's subshell, for the steps after it (conda packages).
__UV_FUNCTION__: "${RAWVM_BUNDLE:?must name the extracted bundle directory}"
if [ -z "${rawvm_python_chosen:-}" ]; then
__PYTHON_SCRIPT__fi
(
set -eu
: "${RAWVM_VENV:?must name the virtualenv to create}"
if ! rawvm_uv --version >/dev/null 2>&1; then
  echo "dask-rawvm: no uv (RAWVM_UV unset, none on PATH)" >&2
  exit 1
fi
# UV_CACHE_DIR, when set, is a warm cache (shared by the local cloud's VMs): uv reads it itself.
# The index settings (UV_INDEX_URL, UV_EXTRA_INDEX_URL, UV_INDEX_STRATEGY, RAWVM_NO_INDEX) come
# from the caller's environment, never from the bundle: they may hold credentials.
# No Python of the client's minor on the image: uv's managed Python of the exact release
# (UV_PYTHON_INSTALL_MIRROR when set).
if [ -z "$rawvm_python" ]; then
  rawvm_uv python install --quiet "$rawvm_python_version"
  rawvm_python=$rawvm_python_version
fi
echo "dask-rawvm: Python $rawvm_python_version wanted; using $rawvm_python" >&2
# Relocatable: its scripts find their interpreter relative to themselves, so the venv can be
# packed as an artifact and unpacked elsewhere (dask_rawvm.environment.artifact).
rawvm_uv venv --quiet --no-config --allow-existing --relocatable --python "$rawvm_python" \
  "$RAWVM_VENV"
set --
[ -d "$RAWVM_BUNDLE/links" ] && set -- "$@" --find-links "$RAWVM_BUNDLE/links"
[ -n "${RAWVM_NO_INDEX:-}" ] && set -- "$@" --no-index
rawvm_uv pip sync --quiet --no-config "$@" --python "$RAWVM_VENV/bin/python" \
  "$RAWVM_BUNDLE/requirements.txt"
set -- "$RAWVM_BUNDLE"/wheels/*.whl
if [ -e "$1" ]; then
  rawvm_uv pip install --quiet --no-config --no-deps --python "$RAWVM_VENV/bin/python" "$@"
fi
)
"""


_SETUP_SCRIPT = r"""# dask-rawvm: the environment step of a VM's boot, sourced by the boot script
# (dask_rawvm.environment.bootstrap) with RAWVM_HOME, RAWVM_BUNDLE (this bundle, extracted),
# RAWVM_VENV, RAWVM_BUNDLE_DIGEST and INSTANCE_ID set and its log and poweroff_vm functions.
# It leaves the venv ready (or powers the VM off) and RAWVM_ARTIFACT_STATE set: "builder"
# when this VM is to publish the environment's artifact (rawvm_artifact_publish).
RAWVM_ARTIFACT_FORMAT=__ARTIFACT_FORMAT__
RAWVM_ARTIFACT_WAIT=${RAWVM_ARTIFACT_WAIT:-__BUILD_WAIT__}
RAWVM_ARTIFACT_POLL=${RAWVM_ARTIFACT_POLL:-__POLL__}
RAWVM_ARTIFACT_STATE=none
__UV_FUNCTION____PYTHON_SCRIPT____ARTIFACT_PUBLISH__
# The artifact's URLs (PUT URLs among them) come from the store, like the index settings.
if [ -n "${RAWVM_ARTIFACT_URL:-}" ]; then
  if RAWVM_ARTIFACT_ENV=$(curl -sf --retry 10 --retry-connrefused "$RAWVM_ARTIFACT_URL"); then
    eval "$RAWVM_ARTIFACT_ENV"
    unset RAWVM_ARTIFACT_ENV
__ARTIFACT_FETCH__  else
    log "warning: could not fetch the artifact's settings: installing the environment"
  fi
fi
if [ "$RAWVM_ARTIFACT_STATE" != unpacked ]; then
  # The install step's index settings may hold credentials: kept in this shell's memory,
  # exported to the install commands only, never written to disk.
  RAWVM_INDEX_ENV=""
  if [ -n "${RAWVM_INDEX_URL:-}" ]; then
    RAWVM_INDEX_ENV=$(curl -sf --retry 10 --retry-connrefused "$RAWVM_INDEX_URL") \
      || { log "could not fetch the package index settings"; poweroff_vm 1; }
  fi
  (
  eval "$RAWVM_INDEX_ENV"
__INSTALL_SCRIPT__  # the venv's install must have succeeded before the conda packages'
  [ $? -eq 0 ] || exit 1
__CONDA_SCRIPT__  )
  if [ $? -ne 0 ]; then
    [ "$RAWVM_ARTIFACT_STATE" = builder ] && rawvm_artifact_failed "the install failed"
    log "environment install failed"; poweroff_vm 1
  fi
  unset RAWVM_INDEX_ENV
fi
"""


def setup_script() -> str:
    """The environment step of a VM's boot: ``setup.sh`` of every bundle.

    Sourced by the boot script (:mod:`dask_rawvm.environment.bootstrap`) once it fetched
    the bundle and uv; shipped in the bundle rather than in user-data, which EC2 limits to
    16 KiB. Steps: choose the venv's Python (:func:`python_script`); when the account keeps
    environment artifacts (``RAWVM_ARTIFACT_URL``), unpack the environment's artifact, or
    build it for the other VMs, or wait for the VM that builds it
    (:mod:`dask_rawvm.environment.artifact`); else, or when that fails, install from the
    package index (:func:`install_script`, then the conda packages). An install that fails
    powers the VM off (a builder first leaves a note for the VMs waiting on it).
    """
    replacements = {
        "__ARTIFACT_FORMAT__": str(ARTIFACT_FORMAT),
        "__BUILD_WAIT__": str(BUILD_WAIT_SECONDS),
        "__POLL__": str(POLL_SECONDS),
        "__UV_FUNCTION__": _UV_FUNCTION,
        "__PYTHON_SCRIPT__": _PYTHON_SCRIPT,
        "__ARTIFACT_PUBLISH__": artifact_publish_script(),
        "__ARTIFACT_FETCH__": artifact_fetch_script(),
        "__INSTALL_SCRIPT__": install_script(),
        "__CONDA_SCRIPT__": conda_install_script(),
    }
    text = _SETUP_SCRIPT
    for placeholder, value in replacements.items():
        text = text.replace(placeholder, value)
    return text


def _vm_python_version(target: Target) -> str:
    """The Python the VM's venv gets: this interpreter's exact release when the target's
    minor version is ours, since Dask warns when client, scheduler and workers differ."""
    local = platform.python_version()
    return local if local.startswith(target.python_version + ".") else target.python_version


def uv_function_script() -> str:
    """Defines the shell function ``rawvm_uv``: the uv at ``$RAWVM_UV``, else the image's."""
    return _UV_FUNCTION


def python_script() -> str:
    """The shell snippet that chooses the venv's Python without downloading one.

    Reads ``$RAWVM_BUNDLE/python-version``; sets ``rawvm_python`` to an interpreter of the
    client's minor version (the image's, preferring the exact release, else its package
    manager's), or to "" when only uv's managed Python (a download) can give it, and
    ``rawvm_python_version``. Runs in the calling shell, so that the boot script knows the
    Python before it decides between an environment artifact and an install
    (:mod:`dask_rawvm.environment.artifact`); :func:`install_script` runs it itself when the
    caller did not.
    """
    return _PYTHON_SCRIPT


def install_script() -> str:
    """The POSIX shell snippet that installs an extracted bundle on a VM.

    It reads ``RAWVM_BUNDLE`` (the extracted bundle directory) and ``RAWVM_VENV`` (the
    virtualenv to create), uses the uv at ``RAWVM_UV`` (else on PATH), picks a Python of the
    client's minor version (the image's, its package manager's, or uv's managed one), honours
    ``UV_CACHE_DIR`` and the index variables of its environment, and runs in a subshell so
    that its ``set -eu`` and positional parameters do not leak into the surrounding script; its
    exit status is the install's. The steps are :func:`install_commands`.

    Returns
    -------
    str
        Shell text ending with a newline, for embedding in the user-data script.
    """
    return _INSTALL_SCRIPT.replace("__UV_FUNCTION__", _UV_FUNCTION).replace(
        "__PYTHON_SCRIPT__", _PYTHON_SCRIPT
    )


def install_commands() -> list[str]:
    """What the VM runs, step by step (documentation of :func:`install_script`)."""
    return [
        'uv="$RAWVM_UV"  # fetched from the cluster\'s store by the boot script',
        "python=python3.X of the client's minor (image, dnf, or `uv python install X.Y.Z`)",
        'uv venv --relocatable --python "$python" "$RAWVM_VENV"',
        'uv pip sync --python "$RAWVM_VENV/bin/python" "$RAWVM_BUNDLE/requirements.txt"',
        'uv pip install --no-deps --python "$RAWVM_VENV/bin/python" "$RAWVM_BUNDLE"/wheels/*.whl',
    ]
