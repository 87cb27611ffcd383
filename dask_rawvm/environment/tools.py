"""The tools a VM's boot needs beyond its image: uv, for the VM's architecture.

A stock image (Amazon Linux 2023) has curl and a system Python, but no pip and no uv. The
client takes uv from the ``uv`` wheel of the VM's platform on the package index (the very
version it runs itself, cached by version and architecture), stores it in the cluster's
store, and the VM fetches it with curl: the boot needs nothing else.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path

from dask_rawvm.environment.indexes import read_index_config
from dask_rawvm.environment.lock import default_cache_dir, uv_binary, uv_environment
from dask_rawvm.environment.target import Target
from dask_rawvm.environment.translate import EnvironmentTranslationError, Problem

#: The oldest glibc uv's Linux wheels need (they are manylinux_2_17 or older).
_UV_PLATFORM = "{arch}-manylinux_2_17"


def uv_version() -> str:
    """The version of uv this client runs (the ``uv`` package's)."""
    return metadata.version("uv")


def uv_for(target: Target, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The uv executable for VMs of ``target``: this client's uv version, their architecture.

    The same architecture as this machine's: the executable the ``uv`` package installed
    here. Another one: extracted from that version's wheel for the target's platform, with
    this machine's index settings, once per version and architecture.

    Raises
    ------
    EnvironmentTranslationError
        The index has no uv wheel for the target (named, with the fix), before any launch.
    """
    if target.arch == Target.local().arch:
        return Path(uv_binary())
    version = uv_version()
    cached = default_cache_dir(cache_dir) / "tools" / f"uv-{version}-{target.arch}" / "uv"
    if cached.is_file():
        return cached
    with tempfile.TemporaryDirectory(prefix="rawvm-uv-") as tmp:
        done = subprocess.run(
            [
                uv_binary(),
                "pip",
                "install",
                "--quiet",
                "--no-config",
                "--no-deps",
                "--only-binary",
                ":all:",
                "--target",
                tmp,
                "--python-platform",
                _UV_PLATFORM.format(arch=target.arch),
                "--python-version",
                target.python_version,
                *read_index_config().uv_args(),
                f"uv=={version}",
            ],
            capture_output=True,
            text=True,
            env=uv_environment(),
            check=False,
            timeout=600,
        )
        built = Path(tmp) / "bin" / "uv"
        if done.returncode != 0 or not built.is_file():
            raise EnvironmentTranslationError(
                [
                    Problem(
                        "uv",
                        f"no uv {version} wheel for {target.arch} could be fetched from the "
                        f"package index: {done.stderr.strip()[-500:]}",
                        "make the package index reachable (the VMs' boot needs uv), or use "
                        "instance types of this machine's architecture",
                    )
                ],
                target,
            )
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".uv.{os.getpid()}")
        shutil.copyfile(built, staging)
        staging.chmod(0o755)
        os.replace(staging, cached)
    return cached
