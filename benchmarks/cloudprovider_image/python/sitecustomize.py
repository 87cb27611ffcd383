"""A local-cloud VM's network as its Python processes would see it on EC2: one address.

On EC2 a process on the host network that listens on every interface (``0.0.0.0``,
as ``dask-scheduler`` does by default) listens on its own VM's address, and its
connections leave from that address. A local-cloud VM shares this machine's network
stack instead: a wildcard listen would take port 8786 on every address of the machine
(colliding with every other scheduler VM, ours and any test's) and connections would
leave from 127.0.0.1. The benchmark image's ``docker`` puts this directory on the
container command's PYTHONPATH, so every Python process it starts (and their
children) imports this module first and gets the VM's view:

- a wildcard bind, or a wildcard passive address lookup, becomes the VM's address;
- a connection to a loopback address leaves from the VM's address.

The address comes from the VM's instance metadata (``RAWVM_IMDS``), looked up once
per container and inherited by its children through the environment.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from typing import Any

_CACHE = "LOCALCLOUD_VM_ADDRESS"
_WILDCARDS = (None, "", "0.0.0.0", "::")


def vm_address() -> str | None:
    """This VM's private IPv4 address, from instance metadata (IMDSv2)."""
    if os.environ.get(_CACHE):
        return os.environ[_CACHE]
    imds = os.environ.get("RAWVM_IMDS")
    if not imds:
        return None
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: no proxy
    request = urllib.request.Request(
        f"{imds}/latest/api/token",
        method="PUT",
        headers={"X-aws-ec2-metadata-token-ttl-seconds": "60"},
    )
    with opener.open(request, timeout=10) as response:
        token = response.read().decode()
    request = urllib.request.Request(
        f"{imds}/latest/meta-data/local-ipv4", headers={"X-aws-ec2-metadata-token": token}
    )
    with opener.open(request, timeout=10) as response:
        address = response.read().decode().strip()
    os.environ[_CACHE] = address
    return address


def confine(address: str) -> None:
    """Make wildcard listens and loopback connections of this process use ``address``."""
    real_getaddrinfo = socket.getaddrinfo
    real_bind = socket.socket.bind
    real_connect = socket.socket.connect
    real_connect_ex = socket.socket.connect_ex

    def getaddrinfo(
        host: Any, port: Any, family: int = 0, type: int = 0, proto: int = 0, flags: int = 0
    ) -> Any:
        passive = flags & socket.AI_PASSIVE and host in _WILDCARDS
        if passive and family in (socket.AF_UNSPEC, socket.AF_INET):
            host, family = address, socket.AF_INET
        return real_getaddrinfo(host, port, family, type, proto, flags)

    def bind(self: socket.socket, where: Any) -> None:
        if self.family == socket.AF_INET and where[0] in _WILDCARDS:
            where = (address, *where[1:])
        real_bind(self, where)

    def leave_from_vm(sock: socket.socket, where: Any) -> None:
        loopback = isinstance(where, tuple) and str(where[0]).startswith(("127.", "localhost"))
        if sock.family == socket.AF_INET and loopback and sock.getsockname() == ("0.0.0.0", 0):
            real_bind(sock, (address, 0))

    def connect(self: socket.socket, where: Any) -> None:
        leave_from_vm(self, where)
        real_connect(self, where)

    def connect_ex(self: socket.socket, where: Any) -> int:
        leave_from_vm(self, where)
        return real_connect_ex(self, where)

    socket.getaddrinfo = getaddrinfo
    socket.socket.bind = bind  # type: ignore[method-assign,assignment]
    socket.socket.connect = connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = connect_ex  # type: ignore[method-assign,assignment]


def _main() -> None:
    try:
        address = vm_address()
    except OSError as error:  # the VM still runs; it just shares the machine's view
        print(f"sitecustomize (local image): no VM address: {error}", file=sys.stderr)
        return
    if address:
        confine(address)


_main()
