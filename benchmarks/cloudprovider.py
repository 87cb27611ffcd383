"""dask-cloudprovider's EC2Cluster on the local cloud: its EC2 calls, its launch time, its adapt.

The comparison the issues ask for, measured rather than quoted: dask-cloudprovider's
``EC2Cluster`` (https://cloudprovider.dask.org) runs against this project's local
cloud, unmodified, from a virtualenv of its own (it is never a dependency of
dask_rawvm), created on first use under ``~/.cache/dask-rawvm/bench-cloudprovider``
with uv: ``dask-cloudprovider[aws]`` plus the dask, distributed and cryptography
versions of the environment running this script.

Figures, one line each:

- provisioning, for each N: the wall time of ``EC2Cluster(n_workers=N)`` (scheduler VM
  boot included) and of ``scale(N)`` on a running cluster until every worker's VM is
  requested, the EC2 calls of each by action (total and mutating), and the calls of
  ``close()``. As in ``benchmarks/provision.py`` this measures the control path: the
  scheduler VM boots, but worker VMs launched after it stay ``pending`` (the local
  cloud's boot delay is raised once the scheduler VM has booted), so no worker process
  competes for the CPU;
- lifecycle: with W workers booted and F scattered results spread across them (data
  that cannot be recomputed), ``adapt(minimum=1, maximum=W)`` on the idle cluster, then
  the results whose data is lost once it has scaled down to one worker. The same
  scenario runs for ``RawVMCluster`` when ``benchmarks/adapt.py`` calls
  :func:`futures_lost_after_adapt`.

What is emulated, and why:

- the machine image. EC2Cluster's user-data is ``#cloud-config`` that installs Docker
  (apt, curl from download.docker.com, systemctl) and runs the scheduler or worker as
  ``docker run --net=host ... daskdev/dask:latest <command>``. There is no Docker here and
  VMs may not reach the internet, so the VMs get an image (``cloudprovider_image/`` first
  on their PATH) where Docker "is installed": ``docker run`` runs the command directly on
  the VM with the ``-e`` variables (see the ``docker`` script for the option mapping),
  the install steps are no-ops, and the Python environment of ``daskdev/dask`` is stood
  in for by the benchmark's virtualenv (same Python, dask and distributed as here),
  also on the image's PATH;
- the network of a VM. A local VM shares this machine's network stack, so the image's
  ``python/sitecustomize.py`` confines the container's Python processes to the VM's own
  address (a wildcard listen, as ``dask-scheduler`` does on 8786, listens there), as
  on EC2;
- cloud-init: the local cloud translates ``#cloud-config`` into a boot script
  (``dask_rawvm.localcloud.cloudinit``); packages are not installed;
- the account: a ``dask-default`` security group exists (EC2Cluster's own creation of
  it fails in dask-cloudprovider 2025.9.0: ``create_default_security_group`` is called
  without its ``tags`` argument), and an Ubuntu 20.04 AMI owned by Canonical's account is
  published, so EC2Cluster's own DescribeImages lookup finds it (moto ships none).

EC2Cluster reaches the local cloud through botocore's ``AWS_ENDPOINT_URL_EC2``. On the
local cloud an instance's IP is in the RunInstances answer; on EC2 it is not, and
EC2Cluster then polls DescribeInstances per worker: the counts here are a lower bound.

    python benchmarks/cloudprovider.py [--sizes 20 100] [--repeat 3] [--workers 4] [--futures 40]

This file runs in two environments: the project's (the local cloud, the parent) and the
benchmark's virtualenv (``--child``: EC2Cluster). Its top level imports only the
standard library for that reason.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
IMAGE = HERE / "cloudprovider_image"
CACHE = Path(os.environ.get("DASK_RAWVM_CACHE_DIR", os.path.expanduser("~/.cache/dask-rawvm")))
VENV = CACHE / "bench-cloudprovider"
#: A boot delay no measurement outlasts: VMs launched while it is set stay pending.
HOLD = 3600.0
#: Canonical's account: EC2Cluster looks its Ubuntu 20.04 image up by this owner.
CANONICAL = "099720109477"
UBUNTU_FOCAL = "ubuntu/images/hvm-ssd/ubuntu-focal-20.04-amd64-server-20250101"
CHILD_TIMEOUT = 900.0
RESULT = "cloudprovider-result: "


# -- the benchmark's virtualenv --------------------------------------------------------------
def requirements() -> list[str]:
    """dask-cloudprovider, with the dask and distributed of this environment.

    And cryptography, which EC2Cluster's default ``security=True`` (temporary TLS
    credentials) needs but none of dask-cloudprovider's extras installs.
    """
    from importlib.metadata import version

    return [
        "dask-cloudprovider[aws]",
        *(f"{name}=={version(name)}" for name in ("dask", "distributed", "cryptography")),
    ]


def ensure_venv(venv: Path = VENV) -> Path:
    """Create (or reuse) the benchmark's virtualenv; return its python.

    Raises
    ------
    RuntimeError
        uv could not create the virtualenv or install into it (its output says why).
    """
    from uv import find_uv_bin

    python = venv / "bin" / "python"
    wanted = "\n".join(requirements())
    marker = venv / "bench-requirements.txt"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return python
    # The base interpreter of this environment: the same Python version as here.
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    uv = find_uv_bin()
    commands = [[uv, "pip", "install", "--quiet", "--python", str(python), *requirements()]]
    if not python.exists():
        commands.insert(0, [uv, "venv", "--quiet", "--python", str(base), str(venv)])
    for command in commands:
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(command[:3])} failed: {result.stderr.strip()[-500:]}")
    marker.write_text(wanted)
    return python


def installed(python: Path) -> str:
    """``dask-cloudprovider X.Y.Z``, as installed in the venv of ``python``."""
    found = python.parent.parent.glob("lib/python*/site-packages/dask_cloudprovider-*.dist-info")
    versions = sorted(p.name.removesuffix(".dist-info").split("-")[1] for p in found)
    return f"dask-cloudprovider {versions[-1] if versions else '(version unknown)'}"


# -- the local cloud, as EC2Cluster needs it (parent) --------------------------------------------
@contextlib.contextmanager
def cloudprovider_cloud(venv_python: Path) -> Iterator[Any]:
    """A LocalCloud whose VMs have the benchmark image, set up as EC2Cluster expects."""
    from dask_rawvm.localcloud import LocalCloud

    image_path = [str(IMAGE), str(venv_python.parent)]
    with LocalCloud(image_path=image_path) as cloud:
        prepare_account(cloud)
        yield cloud


def prepare_account(cloud: Any) -> None:
    """A ``dask-default`` security group and Canonical's Ubuntu 20.04 AMI (see the docstring)."""
    import boto3
    from moto.ec2.models import ec2_backends
    from moto.ec2.models.amis import Ami

    ec2 = boto3.client("ec2", **cloud.client_kwargs())
    vpc = next(v["VpcId"] for v in ec2.describe_vpcs()["Vpcs"] if v["IsDefault"])
    group = ec2.create_security_group(
        GroupName="dask-default", Description="Dask (benchmark)", VpcId=vpc
    )
    ec2.authorize_security_group_ingress(
        GroupId=group["GroupId"],
        IpPermissions=[
            {
                "IpProtocol": "tcp",
                "FromPort": 8786,
                "ToPort": 8787,
                "IpRanges": [{"CidrIp": "0.0.0.0/0"}],
            }
        ],
    )
    # A public image of another account can only be made in moto's backend directly.
    backend = ec2_backends[cloud.account_id][cloud.region]
    backend.amis["ami-0c0ffee0000020040"] = Ami(
        backend,
        ami_id="ami-0c0ffee0000020040",
        name=UBUNTU_FOCAL,
        owner_id=CANONICAL,
        public=True,
        architecture="x86_64",
        virtualization_type="hvm",
        root_device_type="ebs",
        creation_date=datetime(2025, 1, 1, tzinfo=timezone.utc),
    )


@contextlib.contextmanager
def worker_vms_held(cloud: Any) -> Iterator[Callable[[], int]]:
    """Let the first VM launched from now on (the scheduler) boot; hold later ones pending.

    Yields a function giving how many VMs launched since have booted (1 when the
    hold worked: only the scheduler's).
    """
    runtime = cloud.runtime
    before = set(runtime.vms)
    done = threading.Event()

    def booted() -> int:
        vms = dict(runtime.vms)  # a copy: the runtime adds VMs from its own threads
        return sum(1 for i, vm in vms.items() if i not in before and vm.process is not None)

    def hold() -> None:
        while not done.wait(0.005):
            if booted():
                runtime.boot_delay = HOLD
                return

    thread = threading.Thread(target=hold, name="hold-worker-boots", daemon=True)
    thread.start()
    try:
        yield booted
    finally:
        done.set()
        thread.join()
        runtime.boot_delay = 0.0


def run_child(cloud: Any, python: Path, *args: str) -> dict[str, Any]:
    """Run this file with ``--child`` in the benchmark's venv; return its result.

    The child is a process group of its own, killed on timeout; its result (or the
    step that failed and the error) is its last stdout line.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PYTHON", "VIRTUAL"))}
    from dask_rawvm.localcloud import CREDENTIALS

    env.update(
        AWS_ACCESS_KEY_ID=CREDENTIALS["aws_access_key_id"],
        AWS_SECRET_ACCESS_KEY=CREDENTIALS["aws_secret_access_key"],
        AWS_DEFAULT_REGION=cloud.region,
        AWS_ENDPOINT_URL_EC2=cloud.endpoint_url,
        AWS_EC2_METADATA_DISABLED="true",  # credentials are in the environment: no IMDS probe
        NO_PROXY=",".join(filter(None, [os.environ.get("NO_PROXY"), "127.0.0.1", "localhost"])),
    )
    command = [str(python), str(Path(__file__).resolve()), "--child", *args]
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        start_new_session=True,
    )  # fmt: skip
    try:
        out, err = child.communicate(timeout=CHILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(child.pid, signal.SIGKILL)
        out, err = child.communicate()
        return {"step": args[0], "error": f"no result within {CHILD_TIMEOUT:.0f} s"}
    lines = [line for line in out.splitlines() if line.startswith(RESULT)]
    if not lines:
        tail = " | ".join(err.strip().splitlines()[-3:])
        return {"step": args[0], "error": f"exit code {child.returncode}: {tail}"}
    return dict(json.loads(lines[-1].removeprefix(RESULT)))


# -- what is printed (parent) -------------------------------------------------------------------
def calls_text(calls: dict[str, int]) -> str:
    from dask_rawvm.localcloud.faults import is_mutating

    mutating = {a: c for a, c in calls.items() if is_mutating(a)}
    by_action = ", ".join(
        f"{a} {c}" for a, c in sorted(calls.items(), key=lambda item: (-item[1], item[0]))
    )
    return f"{sum(calls.values())} ({sum(mutating.values())} mutating): {by_action}"


PROVISION_MODES = {
    "start": "EC2Cluster(n_workers=N) returned",
    "scale": "EC2Cluster.scale(N) accepted",
}


def measure(cloud: Any, python: Path, mode: str, n: int, repeat: int) -> list[dict[str, Any]]:
    """``repeat`` runs of one provisioning mode, worker VMs held pending; stops at an error."""
    runs = []
    for _ in range(repeat):
        with worker_vms_held(cloud) as booted:
            result = run_child(cloud, python, f"provision-{mode}", str(n))
            result["booted"] = booted()
        runs.append(result)
        if "error" in result:
            break
    return runs


def provision_rows(cloud: Any, python: Path, n: int, repeat: int) -> list[str]:
    """The provisioning lines for N workers: median times, the calls of the last run."""
    label = f"provision N={n}: {installed(python)}"
    rows: list[str] = []
    for mode, what in PROVISION_MODES.items():
        runs = measure(cloud, python, mode, n, repeat)
        last = runs[-1]
        if "error" in last:
            return [*rows, f"{label} EC2Cluster could not run: {failure(last)}"]
        elapsed = statistics.median(r["elapsed"] for r in runs)
        booted = max(r["booted"] for r in runs) - 1  # the scheduler's VM boots
        notes = ["scheduler VM boot included"] if mode == "start" else []
        notes += [f"median of {repeat}"] + ([f"{booted} worker VM(s) booted"] if booted else [])
        rows.append(f"{label} {what} in {elapsed:.2f} s ({', '.join(notes)})")
        rows.append(f"{label} {what.split()[0]} EC2 calls {calls_text(last['calls'])}")
        if mode == "start":
            rows.append(f"{label} EC2Cluster.close() EC2 calls {calls_text(last['close_calls'])}")
    return rows


def cloudprovider_rows(ns: list[int], repeat: int = 3) -> list[str]:
    """Provisioning lines for each N in ``ns`` (for ``benchmarks/provision.py``).

    Never raises for a cluster that cannot run: the line says which step failed and why.
    """
    try:
        python = ensure_venv()
    except Exception as error:
        return [f"provision: dask-cloudprovider EC2Cluster could not run: venv: {error}"]
    with cloudprovider_cloud(python) as cloud:
        return [row for n in ns for row in provision_rows(cloud, python, n, repeat)]


def cloudprovider_adapt_row(workers: int = 4, futures: int = 40) -> str:
    """The lifecycle line: results lost when EC2Cluster adapts down (for ``adapt.py``)."""
    label = f"adapt W={workers}: dask-cloudprovider EC2Cluster"
    try:
        python = ensure_venv()
    except Exception as error:
        return f"{label}: could not run: venv: {error}"
    label = f"adapt W={workers}: {installed(python)} EC2Cluster"
    with cloudprovider_cloud(python) as cloud:
        result = run_child(cloud, python, "adapt", str(workers), str(futures))
    if "error" in result:
        return f"{label}: could not run: {failure(result)}"
    return f"{label}: futures lost = {adapt_text(result)}"


def adapt_text(result: dict[str, Any]) -> str:
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(result["statuses"].items()))
    terminated = result.get("terminate_calls")
    return (
        f"{result['lost']}/{result['futures']}{f' ({statuses})' if statuses else ''}; "
        f"scattered over {result['spread']} workers, {result['workers_left']} left "
        f"{result['elapsed']:.1f} s after adapt()"
        + (f", {terminated} TerminateInstances call(s)" if terminated is not None else "")
    )


def failure(result: dict[str, Any]) -> str:
    return f"step '{result['step']}' failed: {result['error']}"


# -- the scenario (both environments: needs only distributed) ----------------------------------
_STEP = ["start"]


def step(what: str) -> None:
    """Name what runs now: a failure is reported as this step's."""
    _STEP[0] = what


def wait(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Seconds until ``condition()`` holds; TimeoutError after ``timeout``."""
    began = time.monotonic()
    while not condition():
        if time.monotonic() - began > timeout:
            raise TimeoutError(f"{what}: not within {timeout:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - began


def futures_lost_after_adapt(
    cluster: Any, client: Any, workers: int, futures: int, timeout: float = 300
) -> dict[str, Any]:
    """Scatter results over the workers, adapt the idle cluster down to one, count losses.

    Scattered data cannot be recomputed: a result is lost when no worker holds it
    any more once the cluster runs one worker.

    Returns
    -------
    dict
        ``futures``, ``lost``, ``spread`` (workers holding data before),
        ``workers_left`` and ``elapsed`` (s from ``adapt()`` to one worker).
    """
    step(f"wait for {workers} workers to connect")
    client.wait_for_workers(workers, timeout=timeout)
    step("scatter results")
    data = client.scatter([f"result-{i}" for i in range(futures)], broadcast=False)
    spread = len({w for holders in who_has(client, data).values() for w in holders})
    step("adapt down to one worker")
    cluster.adapt(minimum=1, maximum=workers, interval="500ms", wait_count=2)

    def scaled_down() -> bool:  # as the scheduler and the cluster manager both see it
        return len(cluster.workers) == 1 == len(client.scheduler_info(n_workers=-1)["workers"])

    elapsed = wait(scaled_down, timeout, "adapt down to one worker")
    step("count lost results")
    holders = who_has(client, data)
    lost = [f for f in data if not holders.get(f.key) or f.status != "finished"]
    return {
        "futures": futures,
        "lost": len(lost),
        "statuses": dict(Counter(f.status for f in lost)),
        "spread": spread,
        "workers_left": len(client.scheduler_info(n_workers=-1)["workers"]),
        "elapsed": elapsed,
    }


def who_has(client: Any, futures: list[Any]) -> dict[str, list[str]]:
    """Which workers hold each future's data, as the scheduler knows it.

    Asked by key: ``Client.who_has`` refuses futures whose data is already gone.
    """
    keys = [f.key for f in futures]
    return dict(client.sync(client.scheduler.who_has, keys=keys))


# -- the child: EC2Cluster, in the benchmark's venv ----------------------------------------------
class Calls:
    """The local cloud's call counts, through its control API (the child has no dask_rawvm)."""

    def __init__(self, endpoint: str) -> None:
        self.endpoint = endpoint.rstrip("/")
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def _call(self, verb: str) -> Any:
        request = urllib.request.Request(
            f"{self.endpoint}/_localcloud/{verb}", data=b"{}", method="POST"
        )
        with self.opener.open(request, timeout=30) as response:
            return json.loads(response.read())

    def reset(self) -> None:
        self._call("reset-calls")

    def read(self) -> dict[str, int]:
        return dict(self._call("calls"))


def ec2_cluster(n_workers: int) -> Any:
    step("import dask_cloudprovider")
    from dask_cloudprovider.aws import EC2Cluster

    step(f"start EC2Cluster(n_workers={n_workers})")
    return EC2Cluster(region=os.environ["AWS_DEFAULT_REGION"], n_workers=n_workers)


def child_provision_start(calls: Calls, n: int) -> dict[str, Any]:
    calls.reset()
    began = time.perf_counter()
    cluster = ec2_cluster(n)
    elapsed = time.perf_counter() - began
    started = calls.read()
    requested = len(cluster.workers)
    calls.reset()
    step("close EC2Cluster")
    cluster.close()
    return {"elapsed": elapsed, "calls": started, "close_calls": calls.read(), "n": requested}


def child_provision_scale(calls: Calls, n: int) -> dict[str, Any]:
    cluster = ec2_cluster(0)
    try:
        calls.reset()
        step(f"scale({n})")
        began = time.perf_counter()
        cluster.scale(n)
        cluster.sync(cluster._correct_state)  # returns once every worker's VM is requested
        elapsed = time.perf_counter() - began
        return {"elapsed": elapsed, "calls": calls.read(), "n": len(cluster.workers)}
    finally:
        cluster.close()


def child_adapt(calls: Calls, workers: int, futures: int) -> dict[str, Any]:
    from distributed import Client

    with ec2_cluster(workers) as cluster, Client(cluster) as client:
        calls.reset()
        result = futures_lost_after_adapt(cluster, client, workers, futures)
        result["terminate_calls"] = calls.read().get("TerminateInstances", 0)
        return result


def describe(error: BaseException) -> str:
    """An error and what it interrupted (a failure while cleaning up hides the cause)."""
    text = f"{type(error).__name__}: {error}"
    if error.__context__ is not None:
        text += f" (while handling {type(error.__context__).__name__}: {error.__context__})"
    return " ".join(text.split())[:600]


def child(mode: str, args: list[int]) -> None:
    """Run one measurement with EC2Cluster; print its result (or the failure) as JSON."""
    calls = Calls(os.environ["AWS_ENDPOINT_URL_EC2"])
    modes: dict[str, Callable[..., dict[str, Any]]] = {
        "provision-start": child_provision_start,
        "provision-scale": child_provision_scale,
        "adapt": child_adapt,
    }
    try:
        result = modes[mode](calls, *args)
    except Exception as error:
        traceback.print_exc()
        message = describe(error)
        result = {"step": f"{mode}: {_STEP[0]}", "error": message}
    print(RESULT + json.dumps(result), flush=True)


# -- both, side by side -------------------------------------------------------------------------
def main(sizes: list[int], repeat: int, workers: int, futures: int) -> None:
    for row in cloudprovider_rows(sizes, repeat):
        print(row, flush=True)
    print(cloudprovider_adapt_row(workers, futures), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20, 100])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--futures", type=int, default=40)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        child(options.child[0], [int(a) for a in options.child[1:]])
    else:
        main(options.sizes, options.repeat, options.workers, options.futures)
