"""Local VMs sized like their instance type: what Dask's own detection reads inside a VM."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import boto3
import psutil
import pytest
from helpers import wait_for

from dask_rawvm.localcloud import LocalCloud, lifetime, sizing

# What distributed's memory_limit="auto" and dask's nthreads default come from.
DASK_READS = """#!/bin/bash
python -c 'import dask.system, distributed.system
print(f"memory={distributed.system.MEMORY_LIMIT} cpus={dask.system.CPU_COUNT}")'
echo done
sleep 300
"""
# The same files, read with the standard library (a bare VM cannot import Dask).
STDLIB_READS = """#!/bin/bash
python3 - <<'PY'
import os
read = lambda path: int(open(path).read())
quota = read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us")
period = read("/sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us")
cpus = min(len(os.sched_getaffinity(0)), -(-quota // period))
print(f"memory={read('/sys/fs/cgroup/memory/memory.limit_in_bytes')} cpus={cpus}")
PY
echo done
sleep 300
"""

_ISOLATION = LocalCloud().image.isolation  # probed on this machine; nothing is started
needs_sizing = pytest.mark.skipif(
    not _ISOLATION.sized, reason=f"VMs cannot be sized here: {_ISOLATION.notes}"
)


def boot(cloud: LocalCloud, script: str, instance_type: str) -> tuple[str, dict[str, int]]:
    """Boot one VM; its instance id and the ``key=value`` numbers it printed."""
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    (instance,) = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        InstanceType=instance_type,
        UserData=script,
    )["Instances"]
    instance_id = instance["InstanceId"]
    wait_for(lambda: "done" in cloud.console_output(instance_id), 60, "the boot script")
    line = cloud.console_output(instance_id).splitlines()[0]
    numbers = {k: int(v) for k, v in (pair.split("=") for pair in line.split())}
    return instance_id, numbers


def expected(instance_type: str) -> dict[str, int]:
    """What Dask computes on an EC2 VM of ``instance_type`` with this machine's CPUs."""
    size = sizing.instance_size(instance_type)
    assert size is not None
    return {
        "memory": min(size.memory_mib << 20, psutil.virtual_memory().total),
        "cpus": min(size.vcpus, len(os.sched_getaffinity(0))),
    }


@needs_sizing
@pytest.mark.parametrize("instance_type", ["t3.large", "m5.xlarge", "t3.micro"])
def test_dask_sees_the_instance_types_memory_and_cpus(
    cloud: LocalCloud, instance_type: str
) -> None:
    _, seen = boot(cloud, DASK_READS, instance_type)
    assert seen == expected(instance_type)


@needs_sizing
def test_a_bare_vm_reads_the_same_limits() -> None:
    with LocalCloud(image="bare") as cloud:
        _, seen = boot(cloud, STDLIB_READS, "t3.large")
        assert seen == expected("t3.large")
        assert seen["memory"] == 8 << 30


@needs_sizing
def test_cgroups_go_with_their_vm_and_their_cloud() -> None:
    with LocalCloud() as cloud:
        runtime = cloud.runtime
        assert runtime is not None and runtime.cgroups is not None
        instance_id, _ = boot(cloud, DASK_READS, "t3.large")
        vm = runtime.vms[instance_id]
        assert vm.cgroups is not None
        assert vm.cgroups.limits() == sizing.InstanceSize(vcpus=2, memory_mib=8192)
        directories = list(vm.cgroups.directories.values())
        assert all(d.exists() for d in directories)
        boto3.client("ec2", **cloud.client_kwargs()).terminate_instances(InstanceIds=[instance_id])
        wait_for(lambda: not any(d.exists() for d in directories), 15, "the VM's cgroups to go")

        boot(cloud, DASK_READS, "t3.large")  # a VM still running when its cloud closes
        cloud_directories = list(runtime.cgroups.directories.values())
    assert not any(d.exists() for d in cloud_directories)


@needs_sizing
def test_a_process_that_left_its_vms_process_group_ends_with_the_vm(cloud: LocalCloud) -> None:
    instance_id, seen = boot(
        cloud,
        "#!/bin/bash\nsetsid sleep 300 &\necho escaped=$!\necho done\nsleep 300\n",
        "t3.micro",
    )
    escaped = seen["escaped"]
    try:
        assert lifetime.process_start_time(escaped) is not None
        boto3.client("ec2", **cloud.client_kwargs()).terminate_instances(InstanceIds=[instance_id])
        wait_for(lambda: lifetime.process_start_time(escaped) is None, 15, "the escaped process")
    finally:
        if lifetime.process_start_time(escaped) is not None:
            os.kill(escaped, 9)


def test_an_unsized_cloud_gives_every_vm_the_whole_machine() -> None:
    with LocalCloud(sized=False) as cloud:
        assert not cloud.image.isolation.sized
        assert any("sized=False" in note for note in cloud.image.isolation.notes)
        _, seen = boot(cloud, DASK_READS, "t3.micro")
        assert seen["memory"] == psutil.virtual_memory().total


@needs_sizing
def test_cgroups_of_clouds_whose_owner_is_gone_are_removed_at_the_next_start() -> None:
    ended = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)  # fmt: skip
    identity = lifetime.owner_identity(ended.pid)
    ended.communicate(b"")
    assert sizing.sizing_unavailable() is None  # which made the tree
    trees = sizing._tree_directories()
    stale = [tree / f"{identity['pid']}-{identity['start_time']}-123" for tree in trees.values()]
    mine = [tree / f"{os.getpid()}-{lifetime.process_start_time(os.getpid())}-123"
            for tree in trees.values()]  # fmt: skip
    for directory in [*stale, *mine, *(d / "i-0123.0" for d in stale)]:
        directory.mkdir(parents=True)
    try:
        with LocalCloud(boot_delay=3600):
            assert not any(Path(d).exists() for d in stale)
            assert all(Path(d).exists() for d in mine)  # an owner alive: kept
    finally:
        for directory in [*stale, *mine]:
            lifetime.empty_and_remove_cgroup(directory)


def test_where_cgroups_are_not_writable_vms_are_unsized_and_the_cloud_says_so(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from dask_rawvm.localcloud import runtime

    monkeypatch.setattr(runtime, "sizing_unavailable", lambda: "cgroups are not writable here")
    with LocalCloud() as cloud:
        isolation = cloud.image.isolation
        assert not isolation.sized
        assert any("cgroups are not writable here" in note for note in isolation.notes)
        assert cloud.runtime is not None and cloud.runtime.cgroups is None
        _, seen = boot(cloud, DASK_READS, "t3.micro")
        assert seen["memory"] == psutil.virtual_memory().total
