"""The SSH provider against real OpenSSH servers: two "hosts" on two loopback addresses.

Both hosts are this machine (each sshd gives its logins their own home), so the
Dask processes a cluster starts on them are checked here directly, by the
cluster marker in their environment.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import pytest
from distributed import Client
from distributed.comm import get_address_host
from helpers import async_wait_for, wait_for
from sshd import SSHServer, free_port, generate_key, loopback_addresses, make_server, sshd_available

from dask_rawvm import RawVMCluster
from dask_rawvm.config import resolve_options
from dask_rawvm.environment.bootstrap import EnvironmentRef, worker_script
from dask_rawvm.providers.base import ROLE_TAG, LaunchSpec, ProviderError
from dask_rawvm.providers.ssh import HostSpec, SSHProvider

pytestmark = pytest.mark.skipif(
    not sshd_available(), reason="needs OpenSSH's sshd: run ci/install-system-deps.sh"
)


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


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    directory = tmp_path_factory.mktemp("ssh-lab")
    public = generate_key(directory / "client_key")
    servers: list[SSHServer] = []
    try:
        for i, address in enumerate(loopback_addresses(2)):
            servers.append(make_server(directory / f"host{i}", address, public))
        known_hosts = directory / "known_hosts"
        known_hosts.write_text("".join(s.known_hosts_line() + "\n" for s in servers))
        yield Lab(servers, directory, directory / "client_key", known_hosts)
    finally:
        for server in servers:
            server.stop()


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


def processes_named(name: str) -> list[int]:
    """Pids whose command line mentions ``name`` (the bootstrap scripts do)."""
    result = subprocess.run(["pgrep", "-f", name], capture_output=True, text=True)
    return [int(p) for p in result.stdout.split() if int(p) != os.getpid()]


@pytest.fixture
def bystander() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A process of another cluster whose command line names ours: it must survive."""
    name = f"ssh-e2e-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "RAWVM_SSH_CLUSTER": "another", "RAWVM_INSTANCE_ID": "ssh-x-0"}
    process = subprocess.Popen(["sh", "-c", "sleep 300", name], env=env, start_new_session=True)
    try:
        yield process, name
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def ssh_cluster(lab: Lab, *, known_hosts: Path | None = None, **kwargs: Any) -> RawVMCluster:
    """A RawVMCluster on the lab's hosts, options as keywords where RawVMCluster takes them."""
    ssh = {
        "hosts": kwargs.pop("hosts", lab.hosts),
        "workers_per_host": kwargs.pop("workers_per_host", 2),
        "connect_options": lab.connect_options(known_hosts),
    }
    kwargs = {"provider": "ssh", "death_timeout": 20, "scheduler_timeout": 90, **kwargs}
    if "hosts" in inspect.signature(RawVMCluster).parameters:
        return RawVMCluster(**ssh, **kwargs)
    # Until RawVMCluster takes them as keywords: the ssh section of the config.
    config = {f"rawvm.ssh.{key.replace('_', '-')}": value for key, value in ssh.items()}
    with dask.config.set(config):
        return RawVMCluster(**kwargs)


def connected(client: Client) -> set[str]:
    return {w["name"] for w in client.scheduler_info()["workers"].values()}


def live_slots(name: str) -> set[str]:
    return set(cluster_processes(name).values())


# -- the provider alone -------------------------------------------------------------


def test_host_specs() -> None:
    assert HostSpec.parse("alice@lab1:2222") == HostSpec("alice@lab1:2222", "lab1", 2222, "alice")
    assert HostSpec.parse("lab2") == HostSpec("lab2", "lab2", None, None)
    assert HostSpec.parse("[::1]:22").host == "::1"
    assert HostSpec.parse("bob@10.0.0.5").label == "10.0.0.5"
    with pytest.raises(ValueError, match="not an SSH host"):
        HostSpec.parse("a b")


async def test_provider_slots_logs_bundle_and_cleanup(lab: Lab, tmp_path: Path) -> None:
    name = f"ssh-provider-{uuid.uuid4().hex[:6]}"
    options = resolve_options(
        provider="ssh", hosts=lab.hosts, workers_per_host=2, connect_options=lab.connect_options()
    )
    provider = SSHProvider(name, options, stop_grace=2)
    await provider.start()
    try:
        await provider.preflight({"worker": "w", "scheduler": "s"})
        assert provider.target_for("w").arch == os.uname().machine
        bundle = tmp_path / "bundle.tar.gz"
        bundle.write_bytes(os.urandom(4096))
        await provider.store("environments/abc.tar.gz", str(bundle))
        cached = [s.home / ".cache/dask-rawvm/bundles/environments/abc.tar.gz" for s in lab.servers]
        assert all(p.read_bytes() == bundle.read_bytes() for p in cached)
        mtimes = [p.stat().st_mtime_ns for p in cached]
        await provider.store("environments/abc.tar.gz", str(bundle))  # already there: no copy
        assert [p.stat().st_mtime_ns for p in cached] == mtimes
        url = await provider.url_for("environments/abc.tar.gz")
        assert url == cached[0].as_uri()

        # The homes differ: each host's script gets its own path to the bundle.
        script = (
            f"#!/bin/bash\nRAWVM_BUNDLE_URL={url}\n"
            'echo "up $RAWVM_INSTANCE_ID $RAWVM_ADDRESS $RAWVM_LAUNCH_INDEX $RAWVM_POWEROFF"\n'
            'curl -sf "$RAWVM_BUNDLE_URL" | wc -c\n'
            "exec sleep 300\n"
        )
        machines = await provider.launch(LaunchSpec("worker", "w", script, 3, {"team": "x"}))
        assert [m.launch_index for m in machines] == [0, 1, 2]
        assert {m.private_ip for m in machines} == {s.address for s in lab.servers}
        assert all(m.state == "running" and m.tags[ROLE_TAG] == "worker" for m in machines)
        assert live_slots(name) == {m.id for m in machines}
        for machine in machines:
            await async_wait_for(lambda m=machine: "4096" in _read_log(lab, name, m.id), 10)
            log = await provider.console_output(machine.id)
            assert f"up {machine.id} {machine.private_ip} {machine.launch_index} no" in log

        with pytest.raises(ProviderError, match=r"asked for 5 workers.*allow 4"):
            await provider.launch(LaunchSpec("worker", "w", script, 2))
        assert live_slots(name) == {m.id for m in machines}  # all or nothing

        await provider.terminate([machines[0].id])
        await async_wait_for(lambda: machines[0].id not in live_slots(name), 10, "terminate")
        states = {m.id: m.state for m in await provider.describe([m.id for m in machines])}
        assert states == {
            machines[0].id: "terminated",
            machines[1].id: "running",
            machines[2].id: "running",
        }
        live = await provider.live_machines(name)
        assert sorted(m.id for m in live) == sorted(m.id for m in machines[1:])
        assert all(m.tags == {**machines[0].tags} for m in live)

        assert await provider.cleanup(name) == sorted(m.id for m in machines[1:])
        assert live_slots(name) == set()
        assert not any(d.exists() for d in lab.cluster_dirs(name))
        assert all(p.exists() for p in cached)  # the shared bundle cache stays
    finally:
        await provider.cleanup(name)
        await provider.close()


async def test_bootstrap_gets_each_hosts_bundle_path_and_an_install_lock() -> None:
    options = resolve_options(provider="ssh", hosts=["a@lab1", "lab2:2222"])
    provider = SSHProvider("c", options)
    provider.hosts[0].info = {"home": "/home/a"}
    provider.hosts[1].info = {"home": "/srv/homes/b"}
    key = f"environments/{'d' * 64}.tar.gz"
    url = await provider.url_for(key)
    assert url == f"file:///home/a/.cache/dask-rawvm/bundles/{key}"
    script = worker_script(
        "c", "tcp://10.0.0.1:8786", "worker-", 3, 60, None, "auto", EnvironmentRef("d" * 64, url)
    )
    first, second = (provider._script_for(h, script) for h in provider.hosts)
    assert f"RAWVM_BUNDLE_URL={url}\n" in first
    assert f"RAWVM_BUNDLE_URL=file:///srv/homes/b/.cache/dask-rawvm/bundles/{key}\n" in second
    for text in (first, second):
        # The bootstrap serialises the shared venv's install: lock, install, unlock, run.
        lock = text.index("flock 9")
        install = text.index('if [ ! -f "$RAWVM_VENV/.dask-rawvm-installed" ]')
        unlock = text.index("exec 9>&-")
        assert lock < install < unlock < text.index("dask_worker")
        subprocess.run(["bash", "-n"], input=text.encode(), check=True)
    # A script without an environment to install is left as it is.
    plain = worker_script("c", "tcp://10.0.0.1:8786", "worker-", 0, 60)
    assert provider._script_for(provider.hosts[1], plain) == plain


async def test_cleanup_blocking_stops_an_unclosed_clusters_processes(lab: Lab) -> None:
    name = f"ssh-unclosed-{uuid.uuid4().hex[:6]}"
    options = resolve_options(
        provider="ssh", hosts=lab.hosts, connect_options=lab.connect_options()
    )
    provider = SSHProvider(name, options, stop_grace=2)
    await provider.start()
    try:
        await provider.preflight({"worker": "w"})
        await provider.launch(LaunchSpec("worker", "w", "#!/bin/bash\nexec sleep 300\n", 2))
        assert len(live_slots(name)) == 2
        # As at interpreter exit: from synchronous code, over connections of its own.
        stopped = await asyncio.to_thread(provider.cleanup_blocking)
        assert len(stopped) == 2
        assert cluster_processes(name) == {}
    finally:
        await provider.cleanup(name)
        await provider.close()


def _read_log(lab: Lab, name: str, machine_id: str) -> str:
    for directory in lab.cluster_dirs(name):
        log = directory / f"{machine_id}.log"
        if log.exists():
            return log.read_text()
    return ""


# -- RawVMCluster over SSH ----------------------------------------------------------------


def test_cluster_on_two_hosts_scales_adapts_and_cleans_up(
    lab: Lab, bystander: tuple[subprocess.Popen[bytes], str]
) -> None:
    process, name = bystander
    # One thread per worker: adapt's target counts threads, so this load asks for 4.
    with ssh_cluster(lab, n_workers=4, name=name, worker_nthreads=1) as cluster:
        client = cluster.get_client()
        client.wait_for_workers(4, timeout=120)
        workers = client.scheduler_info()["workers"]
        assert connected(client) == {"worker-0", "worker-1", "worker-2", "worker-3"}
        # Two per host, and the scheduler on the first host.
        hosts = sorted(get_address_host(a) for a in workers)
        assert hosts == sorted(2 * [s.address for s in lab.servers])
        assert get_address_host(cluster.scheduler_address) == lab.servers[0].address
        assert len(live_slots(name)) == 5
        assert processes_named(name)  # the bootstrap scripts live in the cluster's directory

        x = da.arange(1_000_000, chunks=100_000).persist()
        assert int(x.sum().compute()) == 499999500000
        logs = cluster.get_logs()
        assert "scheduler of cluster" in logs["Scheduler"]
        assert f"worker worker-0 of cluster {name}" in logs["worker-0"]

        cluster.scale(2)
        wait_for(lambda: len(connected(client)) == 2, 60, "scale(2)")
        wait_for(lambda: len(live_slots(name)) == 3, 30, "retired workers' processes gone")
        assert int(x.sum().compute()) == 499999500000  # data moved, not lost

        cluster.adapt(minimum=1, maximum=4)
        futures = client.map(time.sleep, [0.5] * 60, pure=False)
        wait_for(lambda: len(connected(client)) > 2, 90, "adapt to scale up")
        client.gather(futures)
        del futures
        wait_for(lambda: len(connected(client)) == 1, 90, "adapt to scale down")
        wait_for(lambda: len(live_slots(name)) == 2, 30, "scheduler and one worker left")
        assert int(x.sum().compute()) == 499999500000
        assert max(int(n.split("-")[1]) for n in cluster._launched) >= 4  # fresh names
    # Closed: every process it started on either host is gone, and its files.
    assert cluster_processes(name) == {}
    assert processes_named(name) == [process.pid]  # the bystander, whose argv names it
    assert process.poll() is None
    assert not any(d.exists() for d in lab.cluster_dirs(name))
    assert all(s.process is not None and s.process.poll() is None for s in lab.servers)


def test_wrong_host_key_is_refused_naming_the_host(lab: Lab, tmp_path: Path) -> None:
    impostor = generate_key(tmp_path / "impostor")
    known_hosts = tmp_path / "known_hosts"
    first, second = lab.servers
    known_hosts.write_text(
        first.known_hosts_line() + "\n" + second.known_hosts_line(impostor.rsplit(" ", 1)[0]) + "\n"
    )
    name = f"ssh-badkey-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ProviderError, match="host key not trusted") as error:
        ssh_cluster(lab, known_hosts=known_hosts, name=name)
    assert second.spec in str(error.value)
    assert first.spec not in str(error.value)
    assert cluster_processes(name) == {}
    assert not any(d.exists() for d in lab.cluster_dirs(name))


def test_unreachable_host_fails_fast_naming_it(lab: Lab) -> None:
    (address,) = loopback_addresses(1)
    closed = f"{address}:{free_port(address)}"
    name = f"ssh-down-{uuid.uuid4().hex[:6]}"
    started = time.monotonic()
    with pytest.raises(ProviderError, match="cannot connect") as error:
        ssh_cluster(lab, hosts=[lab.hosts[0], closed], name=name)
    assert time.monotonic() - started < 10
    assert closed in str(error.value)
    assert cluster_processes(name) == {}
    assert not any(d.exists() for d in lab.cluster_dirs(name))


def test_more_workers_than_the_hosts_allow_is_a_clear_error(lab: Lab) -> None:
    name = f"ssh-full-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ProviderError) as error:
        ssh_cluster(lab, n_workers=5, workers_per_host=2, name=name)
    message = str(error.value)
    assert "asked for 5 workers" in message
    assert "workers_per_host=2 allow 4" in message
    assert "add hosts" in message
    wait_for(lambda: cluster_processes(name) == {}, 30, "the scheduler stopped")
    assert not any(d.exists() for d in lab.cluster_dirs(name))
