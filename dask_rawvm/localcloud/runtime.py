"""The local cloud's VM runtime: each EC2 instance is a local process group.

moto keeps the EC2 API state; this module hooks moto's backend so that every
instance that enters ``running`` is booted by running its decoded user-data as
a local process in its own session, and every instance that is stopped or
terminated has its process group killed. A boot script that exits is a VM that
shut itself down: its instance moves to ``terminated`` (or ``stopped``), as its
``InstanceInitiatedShutdownBehavior`` says.

Each instance gets its own loopback address (``127.X.Y.Z``) as both its private
and public IP, so a scheduler VM listens on the real ports (8786, 8787) exactly
as it would on EC2, and the same bootstrap script runs unchanged.

Hooks, not polling: DescribeInstances over a thousand instances takes seconds in
moto, so the runtime is told of launches and terminations by the backend itself.

What a VM sees is its machine image's (:mod:`.vmimage`: ``warm`` or ``bare``), sized like
its instance type where the machine allows it (:mod:`.sizing`). Every VM starts as
:mod:`.vmlaunch` (or, with nothing to set up, a shell) waiting at a gate until the cloud's
watchdog knows it (:mod:`.lifetime`): no VM outlives the process that owns its cloud.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import functools
import heapq
import itertools
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dask_rawvm.localcloud import vmlaunch
from dask_rawvm.localcloud.dense import WORKER_VARIABLE, DenseHosts, script_variables
from dask_rawvm.localcloud.lifetime import Watchdog
from dask_rawvm.localcloud.sizing import (
    VIEW_DIRECTORIES,
    CloudCgroups,
    VMCgroups,
    instance_size,
    sizing_unavailable,
)
from dask_rawvm.localcloud.vmimage import (
    HOST_NETWORK_VARIABLES,
    BareImage,
    Image,
    ImageName,
    Isolation,
    WarmImage,
    own_view_unavailable,
    python_version,
)

__all__ = ["HOST_NETWORK_VARIABLES", "VM", "VMRuntime", "describe_image"]

logger = logging.getLogger(__name__)

# Runtimes by moto account id: each LocalCloud has an account of its own, so
# several local clouds in one process never boot each other's instances.
_RUNTIMES: dict[str, VMRuntime] = {}
_HOOK_LOCK = threading.Lock()
_HOOKED = False

# A private /16 of the loopback range per process, so two processes running local
# clouds side by side rarely collide.
_IP_OCTET = 64 + os.getpid() % 160
_IP_COUNTER = itertools.count(1)


@functools.cache
def _host_uv_cache() -> str:
    if os.environ.get("UV_CACHE_DIR"):
        return os.environ["UV_CACHE_DIR"]
    from uv import find_uv_bin

    result = subprocess.run([find_uv_bin(), "cache", "dir"], capture_output=True, text=True)
    return result.stdout.strip() or os.path.expanduser("~/.cache/uv")


def _host_cache_dir() -> Path:
    return Path(os.environ.get("DASK_RAWVM_CACHE_DIR", os.path.expanduser("~/.cache/dask-rawvm")))


def _allocate_ip() -> str:
    while True:
        n = next(_IP_COUNTER)
        if n & 0xFF not in (0, 255):
            return f"127.{_IP_OCTET}.{(n >> 8) & 0xFF}.{n & 0xFF}"


def install_hooks() -> None:
    """Wrap moto's instance lifecycle methods once per process (idempotent)."""
    global _HOOKED
    with _HOOK_LOCK:
        if _HOOKED:
            return
        from moto.ec2.models.instances import Instance, InstanceBackend

        run_instances = InstanceBackend.run_instances
        terminate, stop, start = Instance.terminate, Instance.stop, Instance.start

        def hooked_run_instances(backend: Any, *args: Any, **kwargs: Any) -> Any:
            reservation = run_instances(backend, *args, **kwargs)
            held = getattr(_HELD_LAUNCHES, "instances", None)
            if held is not None:  # a fleet is being built: it boots them once it is done
                held.extend(reservation.instances)
                return reservation
            runtime = _RUNTIMES.get(backend.account_id)
            if runtime is not None:
                runtime.on_launch(reservation.instances)
            return reservation

        terminating = threading.Lock()  # an API call and a VM's own power-off may race

        def idempotent_terminate(instance: Any) -> Any:
            # EC2 answers TerminateInstances of a terminated instance with its state;
            # moto deletes its delete-on-termination network interface a second time and
            # fails with InvalidNetworkInterfaceID.NotFound (a VM that powered itself off,
            # then terminated by its cluster's close(), hits this).
            with terminating:
                if instance._state.name == "terminated":
                    return copy.copy(instance._state)
                return terminate(instance)

        def halting(method: Callable[[Any], Any]) -> Callable[[Any], Any]:
            def hooked(instance: Any) -> Any:
                previous = method(instance)
                runtime = _RUNTIMES.get(instance.owner_id)
                if runtime is not None:
                    runtime.on_halt(instance.id)
                return previous

            return hooked

        def hooked_start(instance: Any) -> Any:
            previous = start(instance)
            runtime = _RUNTIMES.get(instance.owner_id)
            if runtime is not None and previous.name == "stopped":
                runtime.on_launch([instance])
            return previous

        _hook_console_output()
        _hook_launch_calls()
        _hook_instance_lookup()
        InstanceBackend.run_instances = hooked_run_instances  # type: ignore[method-assign,assignment]
        Instance.terminate = halting(idempotent_terminate)  # type: ignore[method-assign,assignment]
        Instance.stop = halting(stop)  # type: ignore[method-assign,assignment]
        Instance.start = hooked_start  # type: ignore[method-assign,assignment]
        _HOOKED = True


def _hook_console_output() -> None:
    """GetConsoleOutput answers with what the VM's boot script printed, as on EC2."""
    from moto.core.responses import ActionResult
    from moto.core.utils import utcnow
    from moto.ec2.responses.general import General
    from moto.ec2.utils import Base64EncodedString

    original = General.get_console_output

    def get_console_output(response: Any) -> Any:
        instance_id = response._get_param("InstanceId")
        runtime = _RUNTIMES.get(response.ec2_backend.account_id)
        if runtime is None or instance_id not in runtime.vms:
            return original(response)
        text = runtime.console_output(instance_id)[-64 * 1024 :]  # EC2 keeps the last 64 KiB
        result = {
            "InstanceId": instance_id,
            "Timestamp": utcnow(),
            "Output": Base64EncodedString.from_raw_string(text),
        }
        return ActionResult(result)

    General.get_console_output = get_console_output  # type: ignore[method-assign,assignment]


def _hook_instance_lookup() -> None:
    """moto finds an instance by id through an index, not a scan of every instance.

    moto's ``get_instance`` walks every instance of the region, and terminating an instance
    looks itself up again (detaching its root volume), so TerminateInstances of one fleet of
    N is O(N^2): 0.65 s at N = 1000 in process, 0.39 s with the index (measured, moto 5.2.5;
    the scans were half of it under a profiler). moto never removes an instance (terminated
    ones stay), so an entry cannot go stale; an id not in the index rebuilds it once, and one
    still missing is EC2's InvalidInstanceID.NotFound as before.
    """
    from moto.ec2.exceptions import InvalidInstanceIdError
    from moto.ec2.models.instances import InstanceBackend

    def get_instance(backend: Any, instance_id: str) -> Any:
        instance = backend.__dict__.get("_rawvm_instance_index", {}).get(instance_id)
        if instance is None:
            # A new dict, assigned whole: a lookup in another thread sees the old or the new.
            index = {i.id: i for r in list(backend.reservations.values()) for i in r.instances}
            backend._rawvm_instance_index = index
            instance = index.get(instance_id)
        if instance is None:
            raise InvalidInstanceIdError(instance_id)
        return instance

    InstanceBackend.get_instance = get_instance  # type: ignore[method-assign,assignment]


# Instances launched by the current thread while it builds an instant fleet (None otherwise).
_HELD_LAUNCHES = threading.local()


@contextlib.contextmanager
def _boot_when_done(account_id: str) -> Iterator[None]:
    """Boot what moto launches inside the block once, together, when the block ends.

    A fleet's spot instances get their shutdown behaviour and metadata options only after
    moto has made them: holding their boot until then means a boot script never sees an
    instance EC2 would not have made. Each instance is still booted exactly once.
    """
    held: list[Any] = []
    _HELD_LAUNCHES.instances = held
    try:
        yield
    finally:
        _HELD_LAUNCHES.instances = None
        runtime = _RUNTIMES.get(account_id)
        if runtime is not None and held:
            runtime.on_launch(held)


def _hook_launch_calls() -> None:
    """CreateFleet (instant) and RunInstances answer as EC2 does, capacity included.

    Only for local-cloud accounts (those with a capacity model): any other moto account
    in this process keeps moto's behaviour. See :mod:`.capacity`.
    """
    from moto.ec2.responses.fleets import Fleets
    from moto.ec2.responses.instances import InstanceResponse

    from dask_rawvm.localcloud import capacity

    create_fleet = Fleets.create_fleet
    run_instances = InstanceResponse.run_instances

    def hooked_create_fleet(response: Any) -> Any:
        account_id = response.ec2_backend.account_id
        model = capacity.model_for(account_id)
        # Request and maintain fleets launch over time on AWS: moto's answer stands.
        if model is None or response._get_param("Type") != "instant":
            return create_fleet(response)
        with _boot_when_done(account_id):
            return capacity.create_instant_fleet(response, model)

    def hooked_run_instances(response: Any) -> Any:
        model = capacity.model_for(response.ec2_backend.account_id)
        if model is None:
            return run_instances(response)
        give_back = capacity.admit_run_instances(response, model)
        try:
            return run_instances(response)
        except BaseException:
            give_back()
            raise

    Fleets.create_fleet = hooked_create_fleet  # type: ignore[method-assign,assignment]
    InstanceResponse.run_instances = hooked_run_instances  # type: ignore[method-assign,assignment]


class _Timers:
    """One thread running callbacks at their due time (a heap, not a thread each)."""

    def __init__(self, name: str) -> None:
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        with self._cond:
            heapq.heappush(self._heap, (time.monotonic() + delay, next(self._seq), fn))
            self._cond.notify()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._heap.clear()
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._closed and (not self._heap or self._heap[0][0] > time.monotonic()):
                    timeout = self._heap[0][0] - time.monotonic() if self._heap else None
                    self._cond.wait(timeout)
                if self._closed:
                    return
                _, _, fn = heapq.heappop(self._heap)
            try:
                fn()
            except Exception:  # a failing boot must not stop every other VM's
                logger.exception("local cloud runtime callback failed")


@dataclass
class VM:
    """What the runtime knows of one instance."""

    instance: Any  # moto's Instance
    ip: str
    directory: Path
    process: subprocess.Popen[bytes] | None = None
    cgroups: VMCgroups | None = None  # of its current boot, when sized
    halted: bool = False
    instance_action: dict[str, str] | None = None
    token: str = field(default_factory=lambda: os.urandom(16).hex())
    dense: bool = False  # a worker of a dense host (:mod:`.dense`), not a process of its own

    @property
    def console_path(self) -> Path:
        return self.directory / "console.log"


def describe_image(name: ImageName, sized: bool, sizing_failed: str | None = None) -> Image:
    """What VMs of image ``name`` get on this machine (probed once per process).

    Parameters
    ----------
    name
        ``"warm"`` or ``"bare"``.
    sized
        Whether the cloud asks for sized VMs.
    sizing_failed
        Why the cloud could not make its cgroups, if it tried and could not.
    """
    notes = []
    view_unavailable = own_view_unavailable()
    own_view = name == "bare" and view_unavailable is None
    if name == "bare" and view_unavailable:
        notes.append(
            f"no filesystem view of its own ({view_unavailable}): a bare VM is kept apart "
            "by its PATH and environment only, and absolute paths reach this machine's files"
        )
    if sized:
        why_not = sizing_failed or sizing_unavailable()
        if why_not is None and view_unavailable:
            why_not = f"a VM cannot see its own cgroups: {view_unavailable}"
        if why_not:
            notes.append(f"not sized: {why_not} (every VM sees this machine's CPUs and memory)")
        sized = why_not is None
    else:
        notes.append("not sized: sized=False (every VM sees this machine's CPUs and memory)")
    return Image(
        name=name,
        python_version=python_version(),
        has_uv=name == "warm",
        isolation=Isolation(own_view=own_view, sized=sized, notes=tuple(notes)),
    )


class VMRuntime:
    """Boots and halts the instances of one local cloud account.

    Parameters
    ----------
    account_id
        The moto account whose instances this runtime runs.
    workdir
        Where each VM gets a directory (its user-data, console log and home), and the
        machine image its files.
    imds_url
        Maps an instance id to the base URL of its instance-metadata stub.
    s3_endpoint
        The cloud's S3, as the VMs reach it (``AWS_ENDPOINT_URL_S3``); AWS's when None.
    watchdog
        The cloud's watchdog: told of every VM's process group and of the cloud's cgroups,
        it ends them if this process dies without closing the runtime.
    boot_delay
        Seconds an instance stays ``pending`` before it boots.
    shutdown_grace
        Seconds between SIGTERM and SIGKILL when an instance is halted.
    image_path
        Directories the VMs' PATH starts with (after the power-off shims): software
        added to their machine image.
    image
        The machine image, ``"warm"`` or ``"bare"`` (:mod:`.vmimage`).
    sized
        Give each VM its instance type's vCPUs and memory where the machine allows it
        (:mod:`.sizing`).
    dense
        Boot worker VMs as Dask workers in a few host processes (:mod:`.dense`): a thousand
        of them fit on one machine.
    dense_hosts
        Host processes of a dense runtime; this machine's CPU count by default.
    """

    def __init__(
        self,
        account_id: str,
        workdir: Path,
        imds_url: Callable[[str], str],
        watchdog: Watchdog,
        boot_delay: float = 0.0,
        s3_endpoint: str | None = None,
        shutdown_grace: float = 3.0,
        image_path: list[str] | None = None,
        image: ImageName = "warm",
        sized: bool = True,
        dense: bool = False,
        dense_hosts: int | None = None,
    ) -> None:
        self.account_id = account_id
        self.workdir = workdir
        self.imds_url = imds_url
        self.s3_endpoint = s3_endpoint
        self.watchdog = watchdog
        self.boot_delay = boot_delay
        self.shutdown_grace = shutdown_grace
        self.image_path = list(image_path or [])
        self.vms: dict[str, VM] = {}
        self._lock = threading.RLock()
        self._boots = itertools.count()
        self.machine_image: WarmImage | BareImage
        if image == "bare":
            self.machine_image = BareImage(
                workdir / "image",
                _host_cache_dir() / "localcloud-images",
                self.image_path,
                own_view=own_view_unavailable() is None,
                hide=[workdir],  # the other VMs' directories, the cloud's files
            )
        else:
            self.machine_image = WarmImage(
                workdir / "image",
                self.image_path,
                # Local VMs share this machine's uv cache, like a warm machine image: their
                # environments install from it without downloading.
                uv_cache=_host_uv_cache(),
                environments=_host_cache_dir() / "localcloud-environments",
            )
        self.cgroups: CloudCgroups | None = None
        sizing_failed = None
        if describe_image(image, sized).isolation.sized:
            try:
                self.cgroups = CloudCgroups(account_id)
            except OSError as error:
                sizing_failed = f"could not make this cloud's cgroups: {error}"
            else:
                for directory in self.cgroups.directories.values():
                    watchdog.watch_cgroup(directory)
        self.image = describe_image(image, sized, sizing_failed)
        self.dense: DenseHosts | None = None
        if dense:
            self.dense = DenseHosts(
                dense_hosts or os.cpu_count() or 2, workdir / "dense", watchdog, self._dense_exited
            )
        self._timers = _Timers(f"localcloud-{account_id}")
        install_hooks()
        _RUNTIMES[account_id] = self

    # -- events from moto ------------------------------------------------------
    def on_launch(self, instances: list[Any]) -> None:
        for instance in instances:
            with self._lock:
                vm = self.vms.get(instance.id)
                if vm is None:
                    vm = VM(instance, _allocate_ip(), self.workdir / "vms" / instance.id)
                    self.vms[instance.id] = vm
                    nic = instance.nics[0]
                    nic.private_ip_address = vm.ip
                    nic.public_ip = vm.ip
                vm.halted = False
                instance._state.name, instance._state.code = "pending", 0
            self._timers.call_later(self.boot_delay, functools.partial(self._boot, vm))

    def on_halt(self, instance_id: str) -> None:
        with self._lock:
            vm = self.vms.get(instance_id)
            if vm is None or vm.halted:
                return
            vm.halted = True
            process = vm.process
        if vm.dense and self.dense is not None:
            self.dense.halt(instance_id)
        if process is not None and process.poll() is None:
            _signal_group(process.pid, signal.SIGTERM)
            self._timers.call_later(
                self.shutdown_grace, lambda: _signal_group(process.pid, signal.SIGKILL)
            )

    # -- booting -----------------------------------------------------------------
    def _boot(self, vm: VM) -> None:
        with self._lock:
            if vm.halted:
                return
            vm.instance._state.name, vm.instance._state.code = "running", 16
            from dask_rawvm.localcloud.cloudinit import boot_script

            # What cloud-init would run: a #! script as is, #cloud-config translated (the
            # files it writes go under the VM's directory, not over this machine's /).
            user_data = decode_user_data(vm.instance.user_data)
            script = boot_script(user_data, root=str(vm.directory / "root"))
            vm.directory.mkdir(parents=True, exist_ok=True)
            if script is None:
                # Empty or other user-data: a VM with nothing to run.
                vm.console_path.write_text("no boot script in user-data\n")
                return
            path = vm.directory / "user-data"
            path.write_text(script)
            path.chmod(0o700)
            if self.dense is not None:
                variables = script_variables(script)
                if WORKER_VARIABLE in variables:
                    vm.dense = True
                    self.dense.boot(vm.instance.id, self._dense_command(vm, variables))
                    return
            vm.cgroups = self._make_cgroups(vm)
            vm.process = self._start(vm, path)
        threading.Thread(
            target=self._wait,
            args=(vm, vm.process, vm.cgroups),
            name=f"vm-{vm.instance.id}",
            daemon=True,
        ).start()

    def _make_cgroups(self, vm: VM) -> VMCgroups | None:
        if self.cgroups is None:
            return None
        instance_type = vm.instance.instance_type
        size = instance_size(instance_type)
        try:
            if size is None:
                raise ValueError(f"no size known for instance type {instance_type!r}")
            # A name per boot: a stopped VM's cgroups may still be going when it restarts.
            return self.cgroups.create(f"{vm.instance.id}.{next(self._boots)}", size)
        except (OSError, ValueError) as error:
            with open(vm.console_path, "a") as console:
                console.write(f"[local cloud] this VM is not sized: {error}\n")
            return None

    def _start(self, vm: VM, script: Path) -> subprocess.Popen[bytes]:
        """Start the VM's first process; it runs once its cgroups and the watchdog have it."""
        imds = self.imds_url(vm.instance.id)
        environment = {
            **self.machine_image.environment(vm.directory),
            # Where the metadata service is; on EC2 it is 169.254.169.254. The bootstrap
            # reads the first; AWS SDKs (botocore, pyarrow's) read the second, for the
            # credentials of an instance profile.
            "RAWVM_IMDS": imds,
            "AWS_EC2_METADATA_SERVICE_ENDPOINT": f"{imds}/",
        }
        if self.s3_endpoint is not None:
            # This cloud's S3 is the VMs' S3, found the standard way: botocore (boto3,
            # s3fs), pyarrow and the AWS CLI read this variable, so code that runs here runs
            # unchanged on EC2, where S3 is AWS's.
            environment["AWS_ENDPOINT_URL_S3"] = self.s3_endpoint
        view = self.machine_image.view(vm.directory)
        if vm.cgroups is not None:
            view = {**(view or {}), "cgroups": VIEW_DIRECTORIES}
        # The gate is the VM's stdin (dash reads one-digit descriptors only).
        gate, opener = os.pipe()
        try:
            if view is None:  # nothing to set up: a shell waits at the gate (~2 ms)
                wait = 'read _ || exit 1; exec "$0" </dev/null'
                argv = ["/bin/sh", "-c", wait, str(script)]
            else:
                argv = vmlaunch.command(
                    {"cwd": str(vm.directory), "argv": [str(script)], "view": view}
                )
            with open(vm.console_path, "ab") as console:
                process = subprocess.Popen(
                    argv,
                    cwd=vm.directory,
                    env=environment,
                    stdin=gate,
                    stdout=console,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except BaseException:
            os.close(opener)
            raise
        finally:
            os.close(gate)
        try:
            if vm.cgroups is not None:
                vm.cgroups.attach(process.pid)
            self.watchdog.watch_group(process.pid)
            os.write(opener, b"go\n")
        except OSError as error:
            logger.warning("local cloud: could not start VM %s: %s", vm.instance.id, error)
            _signal_group(process.pid, signal.SIGKILL)
        finally:
            os.close(opener)  # the gate reads end-of-file: a VM not let in exits
        return process

    def _dense_command(self, vm: VM, variables: dict[str, str]) -> dict[str, Any]:
        """What a dense host needs to boot a worker VM (see :mod:`.densehost`)."""
        home = vm.directory / "home"
        home.mkdir(parents=True, exist_ok=True)
        size = instance_size(vm.instance.instance_type)
        return {
            "ip": vm.ip,
            "variables": variables,
            "console": str(vm.console_path),
            "home": str(home),
            "launch_index": int(getattr(vm.instance, "ami_launch_index", 0) or 0),
            "vcpus": size.vcpus if size else 1,
            "memory": size.memory_mib * 2**20 if size else 0,
        }

    def _dense_exited(self, instance_id: str, returncode: int) -> None:
        vm = self.vms.get(instance_id)
        if vm is not None:
            self._powered_off(vm, returncode)

    def _wait(self, vm: VM, process: subprocess.Popen[bytes], cgroups: VMCgroups | None) -> None:
        returncode = process.wait()
        _signal_group(process.pid, signal.SIGKILL)  # no orphans outlive their VM
        self.watchdog.forget_group(process.pid)
        if cgroups is not None:
            cgroups.remove()  # what left the group (setsid) is still in its cgroups
        self._powered_off(vm, returncode)

    def _powered_off(self, vm: VM, returncode: int) -> None:
        """A VM's boot script ended: the VM shut itself down, unless it was halted."""
        with self._lock:
            instance = vm.instance
            if vm.halted or instance._state.name != "running":
                return
            with open(vm.console_path, "a") as console:
                console.write(f"\n[local cloud] boot script exited with code {returncode}\n")
        # A VM that powered itself off, outside any API call.
        if instance.instance_initiated_shutdown_behavior == "terminate":
            instance.terminate()
        else:
            instance.stop()
        instance.state_reason.code = "Client.InstanceInitiatedShutdown"
        instance.state_reason.message = (
            "Client.InstanceInitiatedShutdown: Instance initiated shutdown"
        )

    # -- spot interruptions -------------------------------------------------------
    def interrupt(self, instance_id: str, delay: float = 5.0) -> None:
        """Post a spot ``instance-action`` notice, then terminate after ``delay`` s."""
        vm = self.vms[instance_id]
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + delay))
        vm.instance_action = {"action": "terminate", "time": when}
        self._timers.call_later(delay, lambda: self._terminate(instance_id))

    def _terminate(self, instance_id: str) -> None:
        instance = self.vms[instance_id].instance
        if instance._state.name not in ("terminated", "shutting-down"):
            instance.terminate()
            instance.state_reason.code = "Server.SpotInstanceTermination"
            instance.state_reason.message = "Server.SpotInstanceTermination: Spot interruption"

    def console_output(self, instance_id: str) -> str:
        path = self.vms[instance_id].console_path
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        """Halt every VM of this runtime, remove its cgroups and stop its timers."""
        _RUNTIMES.pop(self.account_id, None)
        self._timers.close()
        with self._lock:
            processes = [vm.process for vm in self.vms.values() if vm.process is not None]
            for vm in self.vms.values():
                vm.halted = True
                if vm.instance._state.name not in ("terminated",):
                    vm.instance._state.name, vm.instance._state.code = "terminated", 48
        for process in processes:
            _signal_group(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.shutdown_grace
        for process in processes:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            _signal_group(process.pid, signal.SIGKILL)
        for process in processes:  # a SIGKILLed process is gone once reaped
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=1.0)
        if self.dense is not None:
            self.dense.close()
        if self.cgroups is not None and not self.cgroups.remove():
            logger.warning("local cloud: cgroups %s stayed after close", self.cgroups.name)


def decode_user_data(user_data: Any) -> str:
    if not user_data:
        return ""
    if isinstance(user_data, list):
        user_data = user_data[0]
    if hasattr(user_data, "decode") and not isinstance(user_data, bytes):
        return str(user_data.decode())
    if isinstance(user_data, str):
        # A fleet's instances get the launch template's UserData as moto holds it:
        # still base64 (RunInstances hands over an already-decodable object instead).
        try:
            return base64.b64decode(user_data, validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return user_data
    return str(user_data)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def instance_document(vm: VM) -> str:
    """The ``dynamic/instance-identity/document`` of a VM, as IMDS serves it."""
    instance = vm.instance
    return json.dumps(
        {
            "instanceId": instance.id,
            "instanceType": instance.instance_type,
            "region": instance.region_name,
            "availabilityZone": instance.availability_zone,
            "architecture": instance.architecture,
            "imageId": instance.image_id,
            "privateIp": vm.ip,
        }
    )
