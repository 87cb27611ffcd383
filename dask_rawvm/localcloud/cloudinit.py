"""cloud-init for the local cloud's VMs: user-data in, one POSIX ``sh`` boot script out.

A real VM image runs cloud-init, which reads the user-data and acts on it. The
local cloud has no cloud-init, so it translates what matters of a user-data into
the one script its runtime boots a VM with:

- a ``#!`` script is run as it is, as cloud-init does;
- ``#cloud-config`` YAML becomes a script running, in cloud-init's order,
  ``bootcmd`` (every boot), ``write_files`` (once per instance), ``runcmd``
  (once per instance) and ``power_state``; then, as a real VM would, the VM stays
  up until something powers it off. Package installs (``packages``,
  ``package_update``...) and other modules are not carried out: the machine
  image has the software it has, and the console says what was skipped;
- anything else (empty, ``#include``, MIME multipart) has nothing to run here.

A local VM shares this machine's filesystem, so files cloud-init would write
at absolute paths (``/etc/...``), and its per-instance markers, go under the VM's
own ``root`` directory instead of over this machine's.
"""

from __future__ import annotations

import base64
import gzip
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

CLOUD_CONFIG_HEADER = "#cloud-config"

#: Modules carried out; every other top-level key is reported on the console.
HANDLED = ("bootcmd", "write_files", "runcmd", "power_state")

_PREFIX = "cloud-init (local cloud):"


def boot_script(user_data: str, root: str = "/") -> str | None:
    """The script a VM boots with for ``user_data``, or None if it has nothing to run.

    Parameters
    ----------
    user_data
        The instance's decoded user-data.
    root
        Directory that stands for the VM's ``/`` for the files cloud-config
        writes and cloud-init's per-instance markers.

    Returns
    -------
    str or None
        ``user_data`` itself for a ``#!`` script; the translation of a
        ``#cloud-config`` document (a config that cannot be read gives a script
        that says why on the console, as cloud-init would log it); None otherwise.
    """
    if user_data.startswith("#!"):
        return user_data
    if not user_data.startswith(CLOUD_CONFIG_HEADER):
        return None
    try:
        config = yaml.safe_load(user_data) or {}
        if not isinstance(config, Mapping):
            raise ValueError(f"expected a mapping, got {type(config).__name__}")
        return cloud_config_script(config, root)
    except (yaml.YAMLError, ValueError) as error:
        # cloud-init logs a broken config and boots on: the VM is up, running nothing.
        reason = " ".join(str(error).split())
        return "\n".join(
            ["#!/bin/sh", _echo(f"invalid cloud-config, nothing run: {reason}"), *_stay_up(), ""]
        )


def cloud_config_script(config: Mapping[str, Any], root: str = "/") -> str:
    """Translate a parsed cloud-config into a POSIX ``sh`` script.

    Parameters
    ----------
    config
        The cloud-config document, parsed.
    root
        Directory that stands for the VM's ``/`` (see :func:`boot_script`).

    Returns
    -------
    str
        The script. Each stage runs as a script of its own, as in cloud-init, so
        an ``exit`` or a syntax error in ``bootcmd`` does not skip ``runcmd``;
        nothing stops at a failing command (cloud-init does not either).

    Raises
    ------
    ValueError
        A module's value has a shape cloud-init would reject.
    """
    lines = ["#!/bin/sh", "# translated from #cloud-config by dask_rawvm's local cloud"]
    lines += _notes(config)
    if "bootcmd" in config:
        lines += _stage(_commands(config["bootcmd"], "bootcmd"))
    files = _file_entries(config.get("write_files"))
    # Deferred files are written in cloud-init's final stage: still before runcmd.
    for deferred in (False, True):
        writes = [w for f in files if bool(f.get("defer")) is deferred for w in _write(f, root)]
        lines += _once(f"write_files{'_deferred' if deferred else ''}", writes, root)
    if "runcmd" in config:
        lines += _once("runcmd", _commands(config["runcmd"], "runcmd"), root)
    lines += _power_state(config.get("power_state"))
    return "\n".join(lines) + "\n"


def _notes(config: Mapping[str, Any]) -> list[str]:
    """Console lines naming what this VM does not do of its cloud-config."""
    notes = []
    packages = config.get("packages")
    if packages:
        names = " ".join(p if isinstance(p, str) else shlex.join(map(str, p)) for p in packages)
        notes.append(_echo(f"packages not installed (the image has what it has): {names}"))
    ignored = sorted(str(k) for k in config if k not in HANDLED and k != "packages")
    if ignored:
        notes.append(_echo(f"modules not carried out: {', '.join(ignored)}"))
    return notes


def _commands(items: Any, key: str) -> list[str]:
    """``runcmd``/``bootcmd`` entries as shell lines: strings as they are, lists quoted."""
    if items is None:
        return []
    if isinstance(items, str) or not isinstance(items, Sequence):
        raise ValueError(f"{key} must be a list, got {type(items).__name__}")
    lines = []
    for item in items:
        if isinstance(item, str):
            lines.append(item)
        elif isinstance(item, Sequence):
            lines.append(shlex.join(str(arg) for arg in item))
        else:
            raise ValueError(f"{key} entries must be strings or lists, got {item!r}")
    return lines


def _file_entries(entries: Any) -> list[Mapping[str, Any]]:
    if entries is None:
        return []
    if not isinstance(entries, Sequence) or isinstance(entries, str):
        raise ValueError(f"write_files must be a list, got {type(entries).__name__}")
    for entry in entries:
        if not isinstance(entry, Mapping) or not entry.get("path"):
            raise ValueError(f"write_files entries need a path, got {entry!r}")
    return list(entries)


def _write(entry: Mapping[str, Any], root: str) -> list[str]:
    """Shell lines writing one ``write_files`` entry under ``root``."""
    path = shlex.quote(_under(root, str(entry["path"])))
    data = _decode(entry.get("content", ""), str(entry.get("encoding", "text/plain")))
    redirect = ">>" if entry.get("append") else ">"
    return [
        f'mkdir -p "$(dirname {path})"',
        f"printf {_printf_format(data)} {redirect} {path}",
        f"chmod {_mode(entry.get('permissions', '0644')):04o} {path}",
    ]


def _mode(permissions: Any) -> int:
    """File mode from an octal string (``'0644'``); YAML 1.1 already made ``0644`` an int."""
    if isinstance(permissions, int) and not isinstance(permissions, bool):
        return permissions
    try:
        return int(str(permissions).lower().removeprefix("0o"), 8)
    except ValueError:
        raise ValueError(f"write_files permissions must be octal, got {permissions!r}") from None


def _decode(content: Any, encoding: str) -> bytes:
    """``write_files`` content as bytes, for cloud-init's encodings."""
    raw = content if isinstance(content, bytes) else str(content).encode()
    encoding = encoding.lower()
    if encoding in ("text/plain", ""):
        return raw
    if encoding in ("b64", "base64"):
        return base64.b64decode(raw)
    if encoding in ("gz", "gzip"):
        return gzip.decompress(raw)
    if encoding in ("gz+b64", "gz+base64", "gzip+b64", "gzip+base64"):
        return gzip.decompress(base64.b64decode(raw))
    raise ValueError(f"write_files encoding {encoding!r} is not one cloud-init knows")


def _printf_format(data: bytes) -> str:
    """A quoted ``printf`` format printing exactly ``data`` (any bytes, POSIX octal escapes)."""
    out = []
    for byte in data:
        if byte == ord("%"):
            out.append("%%")
        elif 0x20 <= byte < 0x7F and byte != ord("\\"):
            out.append(chr(byte))
        else:
            out.append(f"\\{byte:03o}")
    return shlex.quote("".join(out))


def _once(name: str, body: list[str], root: str) -> list[str]:
    """Run ``body`` once per instance (a stopped and started VM does not rerun it)."""
    if not body:
        return []
    marker = shlex.quote(_under(root, f"/var/lib/cloud/instance/sem/config_{name}"))
    return [
        f"if [ ! -e {marker} ]; then",
        f'  mkdir -p "$(dirname {marker})" && : > {marker}',
        *_stage(body),
        "fi",
    ]


def _stage(body: list[str]) -> list[str]:
    return [f"/bin/sh -c {shlex.quote(chr(10).join(body))}"] if body else []


def _power_state(power_state: Any) -> list[str]:
    """Power off when cloud-config asks to; otherwise stay up, as a VM does."""
    if power_state is None:
        return _stay_up()
    if not isinstance(power_state, Mapping):
        raise ValueError(f"power_state must be a mapping, got {type(power_state).__name__}")
    mode = str(power_state.get("mode", ""))
    if mode in ("poweroff", "halt"):
        message = power_state.get("message")
        return [*([_echo(str(message))] if message else []), "poweroff"]
    if mode == "reboot":
        return [_echo("power_state reboot not carried out: the VM stays up"), *_stay_up()]
    raise ValueError(f"power_state mode must be poweroff, halt or reboot, got {mode!r}")


def _stay_up() -> list[str]:
    # The runtime powers a VM off when its boot script ends; after cloud-init is done a
    # real VM keeps running until something (shutdown, TerminateInstances) stops it.
    return ["while :; do sleep 3600; done"]


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def _echo(text: str) -> str:
    return f"echo {shlex.quote(f'{_PREFIX} {text}')}"
