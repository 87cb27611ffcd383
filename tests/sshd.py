"""Real OpenSSH servers on loopback addresses, for the SSH provider's tests.

Each :class:`SSHServer` is ``/usr/sbin/sshd -D`` with a generated config, its
own host key and its own loopback address (``127.X.Y.Z``: Linux routes all of
127/8 to ``lo``), so several of them on this machine look like several hosts,
each able to run a Dask scheduler on port 8786. Every login gets the
environment of a small "machine image" through ``SetEnv``: its own ``HOME``
(so what the provider leaves on a host is in the test's directory), a ``PATH``
with this environment's Python and uv, and this machine's uv cache.

Servers are stopped by the pid they were started with, never by name.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dask_rawvm.localcloud.runtime import HOST_NETWORK_VARIABLES  # a test host keeps them too

SSHD = "/usr/sbin/sshd"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
# sshd refuses to start without its privilege separation directory.
PRIVSEP_DIR = Path("/run/sshd")


def sshd_available() -> bool:
    """Whether OpenSSH's server is installed (``ci/install-system-deps.sh`` installs it)."""
    return os.access(SSHD, os.X_OK) and os.access(SSH_KEYGEN, os.X_OK)


def generate_key(path: Path) -> str:
    """A new ed25519 key pair at ``path`` (and ``path.pub``); returns the public key line."""
    subprocess.run(
        [SSH_KEYGEN, "-q", "-t", "ed25519", "-N", "", "-C", "dask-rawvm-test", "-f", str(path)],
        check=True,
    )
    return Path(f"{path}.pub").read_text().strip()


def loopback_addresses(count: int) -> list[str]:
    """Distinct loopback addresses nothing else of the tests uses.

    127.230-239.x.y: clear of the local cloud's 127.64-223 range, and random so
    two test runs side by side rarely meet.
    """
    second = 230 + os.getpid() % 10
    third = random.randrange(1, 255)
    first = random.randrange(1, 250 - count)
    return [f"127.{second}.{third}.{first + i}" for i in range(count)]


def free_port(address: str) -> int:
    """A port nothing listens on at ``address`` (the address is ours alone)."""
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def image_environment(home: Path) -> dict[str, str]:
    """The environment of a login on a test host: this machine as a warm machine image."""
    from uv import find_uv_bin

    uv_cache = subprocess.run(
        [find_uv_bin(), "cache", "dir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    path = [
        os.path.dirname(sys.executable),  # Python with Dask, and uv
        os.path.dirname(find_uv_bin()),
        os.path.join(sys.base_prefix, "bin"),  # the interpreter uv makes venvs from
        "/usr/local/bin",
        "/usr/bin",
        "/bin",
        "/usr/sbin",
        "/sbin",
    ]
    return {
        **{k: os.environ[k] for k in HOST_NETWORK_VARIABLES if k in os.environ},
        "HOME": str(home),
        "PATH": os.pathsep.join(dict.fromkeys(path)),
        "UV_CACHE_DIR": uv_cache,
        "LANG": "C.UTF-8",
    }


@dataclass
class SSHServer:
    """One sshd on ``address:port``; ``home`` is the login's home directory."""

    address: str
    port: int
    directory: Path
    home: Path
    host_key: str  # the public host key line
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def spec(self) -> str:
        """The host as the provider's ``hosts`` lists it."""
        return f"{self.address}:{self.port}"

    def known_hosts_line(self, key: str | None = None) -> str:
        """A known_hosts entry for this server (with another key, for mismatch tests)."""
        return f"[{self.address}]:{self.port} {key or self.host_key}"

    @property
    def log(self) -> str:
        path = self.directory / "sshd.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def start(self, authorized_keys: str, environment: dict[str, str], timeout: float = 10) -> None:
        """Start sshd and wait until it accepts connections."""
        config = self.directory / "sshd_config"
        set_env = " ".join(f'"{k}={v}"' for k, v in environment.items())
        config.write_text(
            "\n".join(
                [
                    f"HostKey {self.directory / 'host_key'}",
                    f"AuthorizedKeysFile {self.directory / 'authorized_keys'}",
                    "PidFile none",
                    "StrictModes no",
                    "UsePAM no",
                    "PermitRootLogin prohibit-password",
                    "PubkeyAuthentication yes",
                    "PasswordAuthentication no",
                    "KbdInteractiveAuthentication no",
                    "AllowTcpForwarding no",
                    "X11Forwarding no",
                    "PrintMotd no",
                    "Subsystem sftp internal-sftp",
                    f"SetEnv {set_env}",
                    "LogLevel VERBOSE",
                ]
            )
            + "\n"
        )
        (self.directory / "authorized_keys").write_text(authorized_keys + "\n")
        PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
        with open(self.directory / "sshd.log", "ab") as log:
            self.process = subprocess.Popen(
                [
                    SSHD,
                    "-D",
                    "-e",
                    "-f",
                    str(config),
                    "-p",
                    str(self.port),
                    "-o",
                    f"ListenAddress={self.address}",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self._accepting():
            if self.process.poll() is not None:
                raise RuntimeError(f"sshd on {self.spec} exited at start:\n{self.log}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sshd on {self.spec} not listening after {timeout} s")
            time.sleep(0.05)

    def _accepting(self) -> bool:
        try:
            socket.create_connection((self.address, self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        """Stop this sshd (only the listener it started; sessions end with it)."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def make_server(directory: Path, address: str, client_key: str) -> SSHServer:
    """Create (not start) a server with a new host key, authorising ``client_key``."""
    directory.mkdir(parents=True, exist_ok=True)
    home = directory / "home"
    home.mkdir(exist_ok=True)
    host_key = generate_key(directory / "host_key")
    server = SSHServer(address, free_port(address), directory, home, host_key)
    server.start(client_key, image_environment(home))
    return server


@dataclass
class Lab:
    """Two SSH hosts, a client key that logs in to both, and a known_hosts of their keys."""

    servers: list[SSHServer]
    directory: Path
    client_key: Path
    known_hosts: Path

    @property
    def hosts(self) -> list[str]:
        # One with a user, one without: both forms of a hosts entry.
        return [f"root@{self.servers[0].spec}", self.servers[1].spec]

    def connect_options(self, known_hosts: Path | None = None) -> dict[str, Any]:
        # Hermetic: this key and these known hosts only; no ~/.ssh/config, no agent.
        return {
            "client_keys": [str(self.client_key)],
            "known_hosts": str(known_hosts or self.known_hosts),
            "config": [],
            "agent_path": None,
        }

    def cluster_dirs(self, name: str) -> list[Path]:
        return [s.home / ".cache" / "dask-rawvm" / "ssh" / name for s in self.servers]


def make_lab(directory: Path) -> Lab:
    """Two started servers on fresh loopback addresses, authorising one new client key."""
    public = generate_key(directory / "client_key")
    servers: list[SSHServer] = []
    try:
        for i, address in enumerate(loopback_addresses(2)):
            servers.append(make_server(directory / f"host{i}", address, public))
    except BaseException:
        for server in servers:
            server.stop()
        raise
    known_hosts = directory / "known_hosts"
    known_hosts.write_text("".join(s.known_hosts_line() + "\n" for s in servers))
    return Lab(servers, directory, directory / "client_key", known_hosts)


def cluster_processes(name: str) -> dict[int, str]:
    """Live processes carrying the cluster's marker, pid -> instance id."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        if f"RAWVM_SSH_CLUSTER={name}".encode() in environ:
            ids = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RAWVM_INSTANCE_ID=")]
            found[int(entry)] = ids[0].decode() if ids else ""
    return found


def live_slots(name: str) -> set[str]:
    return set(cluster_processes(name).values())


def read_log(lab: Lab, name: str, machine_id: str) -> str:
    for directory in lab.cluster_dirs(name):
        log = directory / f"{machine_id}.log"
        if log.exists():
            return log.read_text()
    return ""
