"""The client's dask config, for the VMs: what the user set in code and in their YAML files.

distributed's Nanny hands its process's config to the workers it starts through the
``DASK_INTERNAL_INHERIT_CONFIG`` environment variable (``dask.config.serialize``), which dask
reads at import; nothing does that for a VM. Here the client's config is serialized the same
way, minus what names this machine (local paths, its host name) and dask-rawvm's own client
options, stored in the cluster's store and exported by the VM's boot script before the Dask
process starts. ``DASK_*`` variables the boot script sets (TLS) still win: dask applies them
after the inherited config.
"""

from __future__ import annotations

import re
import socket
from collections.abc import Mapping
from typing import Any

import dask.config

#: Sections that configure the client, not the VMs.
CLIENT_SECTIONS = ("rawvm",)
#: Keys whose values are places on this machine whatever they hold.
LOCAL_KEYS = ("temporary-directory", "temporary_directory", "local-directory", "local_directory")


def vm_config(config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``config`` (dask's current config by default) without what names this machine.

    Left out: the sections in :data:`CLIENT_SECTIONS`, keys in :data:`LOCAL_KEYS`, and any
    string value that is a path on this machine (absolute, ``~``, ``file:``) or holds its host
    name; a list loses such items. Nothing else changes.
    """
    source = dask.config.config if config is None else config
    return {
        key: value
        for key, value in ((k, _clean(v)) for k, v in source.items() if k not in CLIENT_SECTIONS)
        if value is not _DROP
    }


def serialize(config: Mapping[str, Any] | None = None) -> str:
    """:func:`vm_config` as ``DASK_INTERNAL_INHERIT_CONFIG`` carries it."""
    return str(dask.config.serialize(vm_config(config)))


_DROP = object()
#: This machine's names ("localhost" means the VM itself there, so it may stay).
_HOSTS = {n for n in (socket.gethostname(), socket.getfqdn()) if n and n != "localhost"}


def _clean(value: Any, key: str = "") -> Any:
    if key in LOCAL_KEYS:
        return _DROP
    if isinstance(value, Mapping):
        cleaned = {k: _clean(v, str(k)) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v is not _DROP}
    if isinstance(value, list):
        return [v for v in (_clean(item) for item in value) if v is not _DROP]
    if isinstance(value, str) and _names_this_machine(value):
        return _DROP
    return value


def _names_this_machine(text: str) -> bool:
    if text.startswith(("/", "~", "file:")):
        return True
    # The host name as a whole token: "tcp://vm:8786" names it, "llvm:17" does not.
    return any(re.search(rf"(?<![\w.-]){re.escape(host)}(?![\w-])", text) for host in _HOSTS)
