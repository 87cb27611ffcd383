"""The SSH provider against real OpenSSH servers: two "hosts" on two loopback addresses.

Both hosts are this machine (each sshd gives its logins their own home), so the
processes the provider starts on them are checked here directly, by the cluster
marker in their environment.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from pathlib import Path

import pytest
from helpers import async_wait_for
from sshd import Lab, cluster_processes, live_slots, read_log, sshd_available

from dask_rawvm.config import resolve_options
from dask_rawvm.environment.bootstrap import EnvironmentRef, worker_script
from dask_rawvm.errors import ProviderError
from dask_rawvm.providers.base import ROLE_TAG, LaunchSpec
from dask_rawvm.providers.ssh import HostSpec, SSHProvider

pytestmark = pytest.mark.skipif(
    not sshd_available(), reason="needs OpenSSH's sshd: run ci/install-system-deps.sh"
)


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
            await async_wait_for(lambda m=machine: "4096" in read_log(lab, name, m.id), 10)
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
