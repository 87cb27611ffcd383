"""``dask-rawvm env``: show the inventory, every translation decision and the lock.

Nothing is launched; index credentials are masked.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from dask_rawvm.environment import worker_packages
from dask_rawvm.environment.inventory import loose_module_files
from dask_rawvm.environment.lock import Lock, Resolver, lock_environment
from dask_rawvm.environment.sources import resolve_environment_spec
from dask_rawvm.environment.spec import EnvironmentSpec, LocalCode, redact_url
from dask_rawvm.environment.target import Target
from dask_rawvm.environment.translate import (
    CLIENT_SIDE_REASON,
    EnvironmentTranslationError,
    Translation,
    translate_environment,
)


def environment_report(
    environment: str | Sequence[str] = "local",
    target: Target | None = None,
    ignore: Sequence[str] = (),
    *,
    lock: bool = True,
    cache_dir: str | None = None,
    resolver: Resolver = "uv",
    local_code: bool = True,
) -> dict[str, Any]:
    """Everything ``dask-rawvm env`` shows, as a JSON-ready dict.

    Parameters
    ----------
    environment : "local", list of str, or path
        As for ``RawVMCluster(environment=...)``.
    target : Target, optional
        Default: this machine.
    ignore : sequence of str
        ``environment_ignore``.
    lock : bool
        Also resolve (or read the cached lock).
    cache_dir : str, optional
        Cache root.
    resolver : {"uv", "pip-tools"}
    local_code : bool
        As for ``RawVMCluster(local_code=...)``.

    Returns
    -------
    dict
        Keys ``target``, ``inventory``, ``decisions``, ``problems``, ``lock`` and ``error``.
    """
    target = target or Target.local()
    spec = resolve_environment_spec(environment, ignore=ignore, local_code=local_code)
    translation = translate_environment(spec, target, extra=worker_packages(), strict=False)
    report: dict[str, Any] = {
        "target": {**target.as_dict(), "python_platform": target.python_platform},
        "inventory": _inventory(spec),
        "decisions": [d.as_dict() for d in translation.decisions],
        "problems": [p.as_dict() for p in translation.problems],
        "lock": None,
        "error": None,
    }
    if translation.problems:
        report["error"] = str(EnvironmentTranslationError(translation.problems, target))
    elif lock:
        report.update(_lock_section(translation, cache_dir, resolver))
    return report


def _inventory(spec: EnvironmentSpec) -> dict[str, Any]:
    return {
        "origin": spec.origin,
        "python_version": spec.python_version,
        "packages": [
            {
                "name": p.name,
                "requirement": redact_text(p.requirement()),
                "source": p.source,
                "root": p.root,
                **({"conda": p.conda_name} if p.conda_name else {}),
            }
            for p in spec.packages
        ],
        "local_code": [
            {
                "name": c.name,
                "kind": c.kind,
                "path": c.path,
                "modules": list(c.modules),
                "editable": c.editable,
                "bytes": _local_code_bytes(c),
            }
            for c in spec.local_code
        ],
        "client_side": [p.requirement() for p in spec.client_side],
        "index": spec.index.redacted(),
        "ignore": list(spec.ignore),
        "notes": list(spec.notes),
        "conda_channels": list(spec.conda_channels),
    }


def _local_code_bytes(code: LocalCode) -> int | None:
    """What a piece of local code ships, in bytes (None for a project: built at start)."""
    path = Path(code.path)
    if code.kind == "modules":
        return sum(f.stat().st_size for f in loose_module_files(path, code.modules)[0])
    if code.kind == "wheel":
        return path.stat().st_size if path.is_file() else None
    return None


def _lock_section(translation: Translation, cache_dir: str | None, resolver: Resolver) -> dict:
    try:
        lock = lock_environment(translation, cache_dir=cache_dir, resolver=resolver)
    except EnvironmentTranslationError as exc:
        return {"error": str(exc), "problems": [p.as_dict() for p in exc.problems]}
    return {"lock": _lock_dict(lock)}


def _lock_dict(lock: Lock) -> dict[str, Any]:
    return {
        "key": lock.key,
        "path": str(lock.path),
        "from_cache": lock.from_cache,
        "resolver": lock.resolver,
        "pins": [redact_text(pin) for pin in lock.pins],
        "sdists": list(lock.sdists),
        "local_wheels": [c.name for c in lock.local_code],
        "links": [w.name for w in lock.links],
        "notes": list(lock.notes),
    }


def redact_text(text: str) -> str:
    """Mask credentials in every URL inside ``text``."""
    return re.sub(r"[a-z][a-z0-9+.-]*://[^\s;]+", lambda m: redact_url(m.group(0)), text)


def format_report(report: dict[str, Any], verbose: bool = False) -> str:
    """Human-readable text of :func:`environment_report`'s result."""
    inv, target = report["inventory"], report["target"]
    lines = [
        f"Target: {target['arch']} {target['accelerator']}"
        + (f" (CUDA {target['cuda_major']})" if target["cuda_major"] else "")
        + f", Python {target['python_version']}, {target['python_platform']}",
        "",
        f"Inventory ({inv['origin']}, Python {inv['python_version'] or '?'}): "
        f"{len(inv['packages'])} packages ship at their versions, "
        f"{len(inv['local_code'])} local code, "
        f"{len(inv['client_side'])} of dask-rawvm's client side do not",
    ]
    for code in inv["local_code"]:
        what = ", ".join(code["modules"]) if code["modules"] else code["path"]
        size = f" ({_size(code['bytes'])})" if code["bytes"] is not None else ""
        lines.append(f"  ships {code['kind']:<8} {code['name']}: {what}{size}")
    lines += _index_lines(inv["index"])
    lines += [f"  note: {n}" for n in inv["notes"]]
    lines += ["", "Decisions:"]
    client_side = [d for d in report["decisions"] if d["reason"] == CLIENT_SIDE_REASON]
    shown = [
        d
        for d in report["decisions"]
        if verbose or (d["action"] != "keep" and d["reason"] != CLIENT_SIDE_REASON)
    ]
    kept = sum(d["action"] == "keep" for d in report["decisions"]) if not verbose else 0
    for d in shown:
        change = f"{d['before']} -> {d['after'] or '(dropped)'}"
        if d["action"] == "note" or (d["after"] is None and d["action"] != "drop"):
            change = str(d["before"])
        elif d["before"] is None:
            change = str(d["after"])
        lines.append(f"  {d['action']:<7} {d['package']}: {change}\n          {d['reason']}")
    if client_side and not verbose:
        names = ", ".join(d["package"] for d in client_side)
        lines.append(
            f"  drop    {len(client_side)} packages {CLIENT_SIDE_REASON.removeprefix('installed ')}"
            f": {names}"
        )
    if kept:
        lines.append(f"  keep    {kept} packages unchanged (same versions; --verbose lists them)")
    lines += _lock_lines(report)
    return "\n".join(lines) + "\n"


def _size(count: int) -> str:
    return f"{count / 2**20:.1f} MiB" if count >= 2**20 else f"{count / 1024:.0f} KiB"


def _index_lines(index: dict[str, Any]) -> list[str]:
    urls = ([index["index_url"]] if index["index_url"] else []) + index["extra_index_urls"]
    lines = [f"  index: {u}" for u in urls] + [f"  find-links: {u}" for u in index["find_links"]]
    if index["sources"]:
        lines.append(f"  (index settings from {', '.join(index['sources'])})")
    return lines


def _lock_lines(report: dict[str, Any]) -> list[str]:
    lines = [""]
    if report["error"]:
        return [*lines, report["error"]]
    lock = report["lock"]
    if lock is None:
        return [*lines, "Lock: not computed (--no-lock)"]
    state = (
        "from cache, no resolver run" if lock["from_cache"] else f"resolved by {lock['resolver']}"
    )
    lines.append(f"Lock: {len(lock['pins'])} pins ({state})  {lock['path']}")
    lines += [f"  {pin}" for pin in lock["pins"]]
    lines += [f"  local wheel: {name}" for name in lock["local_wheels"]]
    lines += [f"  travels in the bundle: {name}" for name in lock["links"]]
    lines += [f"  note: {note}" for note in lock["notes"]]
    return lines


@click.command("env")
@click.option(
    "--arch",
    type=click.Choice(["x86_64", "aarch64", "arm64", "amd64"]),
    default=None,
    help="VM architecture (default: this machine's).",
)
@click.option("--gpu", is_flag=True, help="Translate for NVIDIA GPU (CUDA) VMs.")
@click.option("--cuda", "cuda_major", type=int, default=None, help="CUDA major (implies --gpu).")
@click.option("--python", "python_version", default=None, help="VM Python X.Y.")
@click.option("--glibc", default=None, help="VM glibc X.Y (default 2.34).")
@click.option(
    "--environment",
    "environment",
    multiple=True,
    help="'local' (default), a lock file, or requirements (repeat the option).",
)
@click.option("--ignore", multiple=True, help="Package to leave out (repeatable).")
@click.option("--no-lock", is_flag=True, help="Do not resolve: inventory and decisions only.")
@click.option("--cache-dir", default=None, help="Cache root (default ~/.cache/dask-rawvm).")
@click.option("--resolver", type=click.Choice(["uv", "pip-tools"]), default="uv")
@click.option("--no-local-code", is_flag=True, help="Ship no local code (local_code=False).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("-v", "--verbose", is_flag=True, help="List unchanged packages too.")
def env_command(
    arch: str | None,
    gpu: bool,
    cuda_major: int | None,
    python_version: str | None,
    glibc: str | None,
    environment: tuple[str, ...],
    ignore: tuple[str, ...],
    no_lock: bool,
    cache_dir: str | None,
    resolver: Resolver,
    no_local_code: bool,
    as_json: bool,
    verbose: bool,
) -> None:
    """Show what the VMs would install: inventory, decisions with reasons, and the lock."""
    local = Target.local()
    cuda = gpu or cuda_major is not None
    target = Target(
        arch=arch or local.arch,  # type: ignore[arg-type]
        accelerator="cuda" if cuda else "cpu",
        cuda_major=cuda_major if cuda else None,
        python_version=python_version or local.python_version,
        glibc=glibc or "2.34",
    )
    env: str | list[str] = _environment_arg(environment)
    report = environment_report(
        env,
        target,
        ignore,
        lock=not no_lock,
        cache_dir=cache_dir,
        resolver=resolver,
        local_code=not no_local_code,
    )
    click.echo(json.dumps(report, indent=1) if as_json else format_report(report, verbose))
    if report["error"]:
        sys.exit(1)


def _environment_arg(values: tuple[str, ...]) -> str | list[str]:
    if not values:
        return "local"
    if len(values) == 1 and (values[0] == "local" or _is_file(values[0])):
        return values[0]
    return list(values)


def _is_file(value: str) -> bool:
    return Path(value).is_file()
