"""Benchmark of a local-cloud VM's start: one line per figure.

    python benchmarks/vmstart.py [--launches 10]

Figures: time from a RunInstances call to the first line of the boot script (the script
prints its own clock: no polling in the figure), median of ``--launches`` sequential
launches after one warm-up, for the warm and the bare image, sized and not; then the memory
and CPUs Dask's own detection (``distributed.system.MEMORY_LIMIT``,
``dask.system.CPU_COUNT``) reports inside a t3.large and an m5.xlarge on the warm image.
Target: a bare VM's own view and cgroups add well under 100 ms to a warm VM's start.
"""

from __future__ import annotations

import argparse
import statistics
import time

import boto3

from dask_rawvm.localcloud import IMAGES, LocalCloud

FIRST_LINE = '#!/bin/bash\necho "t=$(date +%s.%N)"\nsleep 300\n'
DASK_READS = """#!/bin/bash
python -c 'import dask.system, distributed.system
print(f"m={distributed.system.MEMORY_LIMIT} c={dask.system.CPU_COUNT}")'
sleep 300
"""


def launch(cloud: LocalCloud, script: str, instance_type: str = "t3.large") -> str:
    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    (instance,) = ec2.run_instances(
        ImageId="ami-12c6146b", MinCount=1, MaxCount=1, InstanceType=instance_type, UserData=script
    )["Instances"]
    return str(instance["InstanceId"])


def wait_for_line(cloud: LocalCloud, instance_id: str, marker: str) -> str:
    deadline = time.monotonic() + 60
    while marker not in (output := cloud.console_output(instance_id)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{instance_id} printed no {marker!r}: {output}")
        time.sleep(0.01)
    return output.split(marker, 1)[1].split()[0]


def start_time(cloud: LocalCloud) -> float:
    began = time.time()
    instance_id = launch(cloud, FIRST_LINE)
    first_line = float(wait_for_line(cloud, instance_id, "t="))
    boto3.client("ec2", **cloud.client_kwargs()).terminate_instances(InstanceIds=[instance_id])
    return first_line - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--launches", type=int, default=10)
    launches = parser.parse_args().launches
    for image in IMAGES:
        for sized in (False, True):
            with LocalCloud(image=image, sized=sized) as cloud:
                start_time(cloud)  # warm-up: moto's first RunInstances imports its models
                times = [start_time(cloud) for _ in range(launches)]
                active = cloud.image.isolation
            label = f"RunInstances -> first boot line, {image}, sized={sized}"
            note = f"(own view: {active.own_view}, sized: {active.sized}; n={launches})"
            print(f"{label:<58} {statistics.median(times) * 1000:7.0f} ms  {note}", flush=True)
    with LocalCloud() as cloud:
        for instance_type in ("t3.large", "m5.xlarge"):
            instance_id = launch(cloud, DASK_READS, instance_type)
            memory = int(wait_for_line(cloud, instance_id, "m="))
            cpus = wait_for_line(cloud, instance_id, "c=")
            label = f"Dask inside a {instance_type} (warm image)"
            print(f"{label:<58} {memory / 2**30:7.1f} GiB, {cpus} CPUs", flush=True)


if __name__ == "__main__":
    main()
