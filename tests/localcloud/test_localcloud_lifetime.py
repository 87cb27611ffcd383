"""Nothing of a local cloud outlives the process that owns it: VMs, working directory, cgroups."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from helpers import client_process, wait_for

from dask_rawvm.localcloud import LocalCloud, lifetime, vmlaunch

# A VM with a background child, and one more that left the VM's process group (setsid):
# only the VM's cgroup still holds that one.
SLEEPER = """#!/bin/bash
sleep 300 &
child=$!
setsid sleep 300 &
echo "vm=$$ child=$child escaped=$!"
wait
"""

# Owns a local cloud with two booted VMs, says what it started, then waits to be killed.
CLIENT = textwrap.dedent(
    f"""
    import json, sys, time
    import boto3
    from dask_rawvm.localcloud import LocalCloud

    cloud = LocalCloud().start()
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    ids = [i["InstanceId"] for i in ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=2, MaxCount=2, InstanceType="t3.micro",
        UserData={SLEEPER!r},
    )["Instances"]]
    deadline = time.monotonic() + 60
    while not all("escaped=" in cloud.console_output(i) for i in ids):
        assert time.monotonic() < deadline, [cloud.console_output(i) for i in ids]
        time.sleep(0.1)
    pids = {{}}
    for i in ids:
        line = cloud.console_output(i).split("vm=")[1].splitlines()[0]
        for key, pid in (p.split("=") for p in ("vm=" + line).split()):
            pids.setdefault(key, []).append(int(pid))
    print("ready")
    print(json.dumps({{
        "workdir": str(cloud.workdir),
        "watchdog": cloud.runtime.watchdog.process.pid,
        "pids": pids,
        "sized": cloud.image.isolation.sized,
        "cgroups": [str(d) for d in cloud.runtime.cgroups.directories.values()]
            if cloud.runtime.cgroups else [],
    }}), flush=True)
    time.sleep(600)
    """
)


def _alive(pid: int) -> bool:
    return lifetime.process_start_time(pid) is not None  # None: gone, or a zombie


def _kill_leftovers(pids: list[int]) -> None:
    """The test's own VM processes, if a failed assertion left them running."""
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_vms_end_with_the_process_that_owns_their_cloud(tmp_path: Path, how: int) -> None:
    with client_process(CLIENT, tmp_path) as client:
        assert client.stdout is not None
        started = json.loads(client.stdout.readline())
        pids = [pid for group in started["pids"].values() for pid in group]
        try:
            assert all(_alive(pid) for pid in pids)
            os.killpg(client.pid, how)  # the client's own process group: not its VMs'
            client.wait(timeout=30)

            ending = ["vm", "child", "escaped"] if started["sized"] else ["vm", "child"]
            for key in ending:
                for pid in started["pids"][key]:
                    wait_for(lambda p=pid: not _alive(p), 15, f"{key} process {pid} to end")
            wait_for(lambda: not Path(started["workdir"]).exists(), 15, "the workdir to go")
            wait_for(lambda: not _alive(started["watchdog"]), 15, "the watchdog to exit")
            assert not any(Path(d).exists() for d in started["cgroups"])
        finally:
            _kill_leftovers(pids)


def test_what_a_dead_owner_left_behind_goes_at_the_next_start(tmp_path: Path) -> None:
    # Owner and watchdog die together (say, a container's processes all killed at once).
    with client_process(CLIENT, tmp_path) as client:
        assert client.stdout is not None
        started = json.loads(client.stdout.readline())
        pids = [pid for group in started["pids"].values() for pid in group]
        try:
            os.kill(started["watchdog"], signal.SIGKILL)
            wait_for(lambda: not _alive(started["watchdog"]), 15, "the watchdog to die")
            os.killpg(client.pid, signal.SIGKILL)
            client.wait(timeout=30)
            assert Path(started["workdir"]).exists()  # nobody was left to remove it

            with LocalCloud(boot_delay=3600):
                assert not Path(started["workdir"]).exists()
                if started["sized"]:  # its cgroups held its VMs: gone with them
                    assert not any(Path(d).exists() for d in started["cgroups"])
                    assert not any(_alive(pid) for pid in pids)
        finally:
            _kill_leftovers(pids)


def test_a_vm_whose_owner_dies_before_letting_it_in_runs_nothing(tmp_path: Path) -> None:
    ran = tmp_path / "ran"
    script = tmp_path / "user-data"
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    script.chmod(0o700)
    for owner_lets_it_in in (False, True):
        gate, opener = os.pipe()
        spec: vmlaunch.Spec = {"cwd": str(tmp_path), "argv": [str(script)], "view": None}
        process = subprocess.Popen(vmlaunch.command(spec), stdin=gate)
        os.close(gate)
        if owner_lets_it_in:
            os.write(opener, b"go\n")
        os.close(opener)  # an owner that dies closes it too
        assert process.wait(timeout=30) == (0 if owner_lets_it_in else 1)
        assert ran.exists() == owner_lets_it_in


def test_only_directories_of_owners_certainly_gone_are_reaped(tmp_path: Path) -> None:
    ended = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    dead = lifetime.owner_identity(ended.pid)
    ended.communicate(b"")
    alive = lifetime.owner_identity()
    elsewhere = {**dead, "pid_namespace": "pid:[1]"}  # a container sharing this /tmp
    rebooted = {**alive, "boot_id": "another boot"}
    assert lifetime.owner_gone(dead) and lifetime.owner_gone(rebooted)
    assert not lifetime.owner_gone(alive) and not lifetime.owner_gone(elsewhere)

    for name, identity in [("dead", dead), ("alive", alive), ("elsewhere", elsewhere)]:
        directory = tmp_path / f"cloud-{name}"
        directory.mkdir()
        (directory / lifetime.OWNER_RECORD).write_text(json.dumps(identity))
    (tmp_path / "cloud-unrecorded").mkdir()
    assert lifetime.reap_stale_directories(tmp_path, "cloud-") == [tmp_path / "cloud-dead"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cloud-alive",
        "cloud-elsewhere",
        "cloud-unrecorded",
    ]
