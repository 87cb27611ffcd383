"""RawVMCluster over SSH against real OpenSSH servers: two "hosts" on two loopback addresses.

Both hosts are this machine (each sshd gives its logins their own home), so the
Dask processes a cluster starts on them are checked here directly, by the cluster
marker in their environment.
"""

from __future__ import annotations

import inspect
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dask
import dask.array as da
import pytest
from distributed import Client
from distributed.comm import get_address_host
from helpers import wait_for
from sshd import (
    Lab,
    cluster_processes,
    free_port,
    generate_key,
    live_slots,
    loopback_addresses,
    sshd_available,
)

from dask_rawvm import RawVMCluster
from dask_rawvm.errors import ProviderError

pytestmark = pytest.mark.skipif(
    not sshd_available(), reason="needs OpenSSH's sshd: run ci/install-system-deps.sh"
)


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
        (first,) = [a for a, w in workers.items() if w["name"] == "worker-0"]
        assert f"worker worker-0 of cluster {name}" in logs[first]  # keyed by address

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
