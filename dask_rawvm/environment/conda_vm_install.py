"""Install a bundle's locked conda packages into a prefix. Runs on the VM, not on the client.

dask-rawvm copies this file into every bundle that has conda packages (``conda/install.py``)
and the VM runs it with the Python of a small tool venv that holds py-rattler and nothing else
(:func:`dask_rawvm.environment.conda.conda_install_script`). So it must stay self-contained:
standard library and ``rattler`` only, no ``dask_rawvm`` import.

Usage::

    python install.py --prefix "$RAWVM_VENV/conda" --cache "$RAWVM_HOME/conda-pkgs"

It reads ``lock.yaml`` (a rattler lock file with one platform) next to itself. Packages of local
(``file://``) channels come from ``pkgs/`` next to it, since the client's files are not
reachable from a VM; every other package is downloaded from its URL. Exit status 0 means the
prefix holds exactly the locked packages (running it again is a no-op).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import traceback
from pathlib import Path

from rattler import LockFile, Subdir, install

#: ``uname -m`` -> conda subdir of the Linux machines dask-rawvm launches.
_MACHINE_SUBDIR = {"x86_64": "linux-64", "aarch64": "linux-aarch64", "arm64": "linux-aarch64"}


def main(argv: list[str] | None = None) -> int:
    """Install ``lock.yaml``'s packages into ``--prefix``; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefix", required=True, help="conda prefix to create or update")
    parser.add_argument("--cache", required=True, help="package cache (shared by installs)")
    args = parser.parse_args(argv)
    here = Path(__file__).resolve().parent
    started = time.monotonic()
    lock = LockFile.from_path(here / "lock.yaml")
    environment = lock.default_environment()
    platforms = environment.platforms() if environment is not None else []
    if environment is None or len(platforms) != 1:
        print(f"dask-rawvm: {here / 'lock.yaml'} must lock one platform", file=sys.stderr)
        return 2
    subdir = platforms[0].name
    machine = platform.machine()
    if _MACHINE_SUBDIR.get(machine) != subdir:
        print(
            f"dask-rawvm: the bundle's conda packages are built for {subdir}, but this machine "
            f"is {machine}; the environment was prepared for another instance type",
            file=sys.stderr,
        )
        return 2
    records = environment.conda_repodata_records_for_platform(platforms[0]) or []
    for record in records:
        if record.url.startswith("file:"):
            shipped = here / "pkgs" / record.file_name
            if not shipped.is_file():
                print(f"dask-rawvm: {shipped} is missing from the bundle", file=sys.stderr)
                return 2
            record.url = shipped.as_uri()
    # Link scripts are not run: conda's own default is the same for untrusted packages, and
    # the packages dask-rawvm ships (C libraries and tools) do not need them.
    asyncio.run(
        install(
            records,
            target_prefix=args.prefix,
            cache_dir=Path(args.cache),
            platform=Subdir(subdir),
            execute_link_scripts=False,
            show_progress=False,
        )
    )
    took = time.monotonic() - started
    print(f"dask-rawvm: {len(records)} conda packages in {args.prefix} ({took:.1f} s)")
    return 0


def _exit(status: int) -> None:
    """End the process without interpreter finalization.

    py-rattler 0.28's ``install()`` leaves a native thread that touches the interpreter while
    it finalizes: about a third of runs then die (SIGABRT "PyGILState_Release: thread state
    must be current", or SIGSEGV) *after* a complete install (measured: 9 of 30 runs; 0 of 30
    with this exit). Nothing is left to clean up by then, so the streams are flushed and the
    process ends with the install's status.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    try:
        code = main()
    except BaseException:
        traceback.print_exc()
        code = 1
    _exit(code)
