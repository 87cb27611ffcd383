"""``LocalCloud``: moto's EC2, SSM and S3 APIs served in-process, with VMs that run.

A LocalCloud is a werkzeug server on ``127.0.0.1`` (a free port by default) in
front of moto's WSGI app. A small middleware in between

- gives the cloud a moto account of its own (moto honours ``x-moto-account-id``),
  so two local clouds in one process share nothing;
- injects faults and latency by API action and counts calls (:mod:`.faults`);
- limits capacity by instance type, zone and market, and answers CreateFleet (instant) and
  RunInstances as EC2 does when a pool runs out (:mod:`.capacity`);
- serves each VM's instance metadata under ``/_imds/<id>/`` (:mod:`.imds`);
- answers as strictly as EC2 where a test turns it on (:mod:`.strict`): eventual
  consistency, paged listings, expiring IMDS tokens, EC2's launch refusals, Service
  Quotas (:mod:`.quotas`) and IAM (:mod:`.iam`);
- serves a small control API under ``/_localcloud/`` so a process that did not
  start the cloud (a benchmark, a test's subprocess) can inject faults, read
  call counts, limit capacity and interrupt spot instances: see :class:`RemoteCloud`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from werkzeug.serving import BaseWSGIServer, WSGIRequestHandler, make_server

from dask_rawvm.localcloud import capacity, faults, imds, quotas, strict
from dask_rawvm.localcloud.images import publish_gpu_images
from dask_rawvm.localcloud.lifetime import Watchdog, reap_stale_directories, write_owner_record
from dask_rawvm.localcloud.runtime import VMRuntime, describe_image
from dask_rawvm.localcloud.sizing import reap_stale_cgroups
from dask_rawvm.localcloud.vmimage import IMAGES, Image, ImageName

logger = logging.getLogger(__name__)

#: Credentials any client of a local cloud may use (moto accepts anything).
CREDENTIALS = {"aws_access_key_id": "localcloud", "aws_secret_access_key": "localcloud"}

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

#: Working directories of local clouds: ``<temp dir>/<prefix><random>``.
WORKDIR_PREFIX = "dask-rawvm-localcloud-"


class _QuietHandler(WSGIRequestHandler):
    def log_request(self, *args: Any, **kwargs: Any) -> None:  # one line per API call is noise
        pass


class LocalCloud(strict.LocalStrictness):
    """An EC2-compatible cloud on this machine, whose instances are local processes.

    Each instance that enters ``running`` boots by running its user-data as a process
    group of this machine; what that process sees is its *machine image*:

    ``image="warm"`` (the default, for fast tests)
        This machine as the client sees it: ``PATH`` starts with the client's environment
        (Python with Dask, and uv), the machine's uv cache is shared, and environments
        install once per machine into a shared directory, so a VM boots in about a second.
        Not an honest stand-in for an EC2 VM: it already has what a real one must fetch.
    ``image="bare"`` (what a fresh Amazon Linux 2023 VM has)
        A system ``python3`` (this machine's base interpreter through a virtualenv without
        pip: the standard library only), curl, bash, coreutils, tar, gzip, awk, sed, grep,
        flock, setsid and the machine's other tools, but no uv, no pip and no client
        virtualenv; its own ``HOME`` (so an empty uv cache) and its own ``RAWVM_HOME``.
        Where mount namespaces work (as root), each VM also has a filesystem view of its
        own: private ``/tmp``; the client's working directory, home, virtualenv and caches,
        and other VMs' directories not visible; ``pip`` masked and ``/usr/bin/python3`` the
        image's. Elsewhere it is kept apart by ``PATH`` and environment only.

    Both images pass this machine's trust store and proxy variables through. Both are
    *sized* (``sized=True``) where the machine allows it (cgroup v1 writable, mount
    namespaces): each VM gets its instance type's vCPUs and memory as cgroup limits, seen
    at the cgroup root, so Dask's ``memory_limit="auto"`` and CPU count read what they
    would on EC2 (a t3.large: 2 vCPUs, 8 GiB; vCPUs beyond this machine's CPUs cap at its
    count). :attr:`image` says what a cloud's VMs get, including which isolation is
    active and why a feature is off.

    VMs end with the cloud: on :meth:`close`, and, if the owning process dies without
    closing it (SIGKILL included), within seconds by the cloud's watchdog, which also
    removes the cloud's temporary working directory and cgroups. What a watchdog could not
    remove is removed at the next LocalCloud start in this machine.

    Parameters
    ----------
    region
        The region the cloud answers for (any AWS region name moto knows).
    port
        TCP port on 127.0.0.1; 0 picks a free one.
    boot_delay
        Seconds an instance stays ``pending`` before its user-data runs.
    workdir
        Directory for VM files (user-data, console logs, homes) and image files. A
        temporary directory, removed on close (or by the watchdog), by default.
    image_path
        Directories first on the VMs' PATH, after the power-off shims: software added to
        their machine image (a test's broken ``curl``, say).
    image
        ``"warm"`` or ``"bare"``, see above.
    sized
        Size VMs like their instance type where the machine allows it; False gives every
        VM the whole machine (benchmarks that pack many VMs).
    dense
        Boot worker VMs as Dask workers in a few host processes (:mod:`.dense`), so that a
        thousand fit on one machine: for measuring the cluster manager at scale. Other VMs
        (the scheduler's) boot as usual.
    dense_hosts
        Host processes of a dense cloud; this machine's CPU count by default.

    Examples
    --------
    >>> with LocalCloud() as cloud:                     # doctest: +SKIP
    ...     cloud.inject("RunInstances", error="InsufficientInstanceCapacity")
    ...     print(cloud.endpoint_url, cloud.calls)
    >>> LocalCloud(image="bare").image                  # doctest: +SKIP
    Image(name='bare', python_version='3.11.7', has_uv=False,
          isolation=Isolation(own_view=True, sized=True, notes=()))
    """

    def __init__(
        self,
        region: str = "us-east-1",
        port: int = 0,
        boot_delay: float = 0.0,
        workdir: str | Path | None = None,
        image_path: list[str] | None = None,
        image: ImageName = "warm",
        sized: bool = True,
        dense: bool = False,
        dense_hosts: int | None = None,
    ) -> None:
        if image not in IMAGES:
            raise ValueError(
                f"LocalCloud(image={image!r}): no such local image; use one of {IMAGES} "
                "('warm': this machine's environment, fast; 'bare': a fresh Amazon Linux VM)"
            )
        self.region = region
        self.image_path = image_path
        self.image_name: ImageName = image
        self.sized = sized
        self.dense = dense
        self.dense_hosts = dense_hosts
        self.port = port
        self.boot_delay = boot_delay
        # A fresh 12-digit moto account: this cloud's state is its own.
        self.account_id = str(random.randrange(10**11, 10**12))
        self._given_workdir = Path(workdir) if workdir is not None else None
        self._workdir: Path | None = self._given_workdir
        self.faults = faults.FaultInjector()
        self.capacity = capacity.CapacityModel()
        # What EC2 does that moto does not, as tests turn it on (see .strict).
        self.strictness = strict.Strictness()
        self.imds_tokens = imds.Tokens()
        self.quotas = quotas.Quotas()
        self.runtime: VMRuntime | None = None
        self._server: BaseWSGIServer | None = None
        self._thread: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None

    # -- lifecycle ---------------------------------------------------------------
    @property
    def endpoint_url(self) -> str:
        if self._server is None:
            raise RuntimeError("LocalCloud is not started: use `with LocalCloud() as cloud:`")
        return f"http://127.0.0.1:{self._server.server_port}"

    @property
    def workdir(self) -> Path:
        """The directory of this cloud's VM and image files."""
        if self._workdir is None:
            raise RuntimeError("LocalCloud is not started: its working directory comes with it")
        return self._workdir

    @property
    def image(self) -> Image:
        """What this cloud's VMs boot with: image name, ``python3`` version, isolation.

        Known before :meth:`start` (probed on this machine); after it, what the cloud
        actually got (e.g. not sized if it could not make its cgroups).
        """
        if self.runtime is not None:
            return self.runtime.image
        return describe_image(self.image_name, self.sized)

    def start(self) -> LocalCloud:
        """Start serving (idempotent); returns self."""
        if self._server is not None:
            return self
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

        # What clouds of owners that died (and whose watchdogs died too) left behind.
        reap_stale_directories(Path(tempfile.gettempdir()), WORKDIR_PREFIX)
        reap_stale_cgroups()
        own_workdir = self._given_workdir is None
        workdir = self._given_workdir or Path(tempfile.mkdtemp(prefix=WORKDIR_PREFIX))
        workdir.mkdir(parents=True, exist_ok=True)
        self._workdir = workdir
        watchdog = Watchdog()
        if own_workdir:
            write_owner_record(workdir)
            watchdog.watch_directory(workdir)
        try:
            self._server = make_server(
                "127.0.0.1",
                self.port,
                _Middleware(self, DomainDispatcherApplication(create_backend_app)),
                threaded=True,
                request_handler=_QuietHandler,
            )
            endpoint = self.endpoint_url  # not `self`: the runtime must not keep the cloud alive
            self.runtime = VMRuntime(
                self.account_id,
                workdir,
                imds_url=lambda iid: f"{endpoint}/_imds/{iid}",
                s3_endpoint=endpoint,
                watchdog=watchdog,
                boot_delay=self.boot_delay,
                image_path=self.image_path,
                image=self.image_name,
                sized=self.sized,
                dense=self.dense,
                dense_hosts=self.dense_hosts,
            )
        except BaseException:
            if self._server is not None:
                self._server.server_close()
                self._server = None
            if own_workdir:
                shutil.rmtree(workdir, ignore_errors=True)
            watchdog.release()
            raise
        capacity.register(self.account_id, self.capacity)
        quotas.register(self.account_id, self.quotas)
        publish_gpu_images(self.account_id, self.region)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="localcloud-server", daemon=True
        )
        self._thread.start()
        # Whatever happens to the owner, its VMs do not outlive this process.
        self._finalizer = weakref.finalize(
            self,
            _shutdown,
            self._server,
            self.runtime,
            self.account_id,
            workdir if own_workdir else None,
            watchdog,
        )
        logger.info(
            "local cloud serving %s (region %s, %s image)",
            self.endpoint_url,
            self.region,
            self.image_name,
        )
        return self

    def close(self) -> None:
        """Halt every VM, stop serving and forget this cloud's state (idempotent)."""
        if self._finalizer is not None:
            self._finalizer()
        self._server = None

    def __enter__(self) -> LocalCloud:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> LocalCloud:
        return await asyncio.to_thread(self.start)

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.close)

    # -- what tests and benchmarks use -------------------------------------------
    def inject(
        self,
        action: str,
        error: str | None = None,
        count: int = 1,
        latency: float = 0.0,
        message: str | None = None,
        status: int | None = None,
        after: int = 0,
    ) -> None:
        """Fail the next ``count`` calls of ``action`` with ``error`` (after ``after`` calls
        went through), or add ``latency``.

        See :meth:`dask_rawvm.localcloud.faults.FaultInjector.inject`.
        """
        self.faults.inject(action, error, count, latency, message, status, after)

    def clear_faults(self) -> None:
        self.faults.clear()

    @property
    def calls(self) -> Counter[str]:
        """API calls received so far, by action (``RunInstances``, ...)."""
        return self.faults.calls

    def reset_calls(self) -> None:
        """Forget the call counts and the logged request parameters."""
        self.faults.reset_calls()

    def requests(self, action: str) -> list[dict[str, str]]:
        """Parameters of the last EC2 requests of ``action``, oldest first (faulted ones too).

        Parameters
        ----------
        action
            An EC2 API action, e.g. ``"CreateFleet"``.

        Returns
        -------
        list of dict
            One flat dict per request, as sent on the wire
            (``{"ClientToken": ..., "TargetCapacitySpecification.TotalTargetCapacity": "10"}``).
            The last :data:`~dask_rawvm.localcloud.faults.REQUEST_LOG_SIZE` requests are kept.

        Examples
        --------
        >>> tokens = {r["ClientToken"] for r in cloud.requests("CreateFleet")}  # doctest: +SKIP
        """
        return self.faults.requests(action)

    def set_capacity(
        self,
        instance_type: str | None = None,
        zone: str | None = None,
        market: str | None = None,
        count: int | None = 0,
    ) -> None:
        """Let the capacity pools a scope covers launch only ``count`` more instances.

        Launches beyond it fail as on EC2: RunInstances with InsufficientInstanceCapacity
        (HTTP 500), an instant fleet by reporting the pool in its ``Errors`` and launching
        what the other pools have. Capacity a launch took does not come back when its
        instances terminate; :meth:`restore_capacity` brings it all back.

        Parameters
        ----------
        instance_type, zone, market
            The scope: an instance type, an availability zone (``us-east-1a``) and a market
            (``"on-demand"`` or ``"spot"``); None covers every value. Limits add up: a
            launch consumes from every limit that covers its pool, and a pool can launch
            as many as the tightest of them allows.
        count
            Instances the scope can still launch: 0 exhausts it, None lifts its limit.

        Examples
        --------
        >>> cloud.set_capacity("m6i.large", "us-east-1a", "spot")      # doctest: +SKIP
        >>> cloud.set_capacity(market="spot", count=10)  # 10 more spot instances, anywhere
        >>> cloud.restore_capacity()
        """
        self.capacity.set_limit(instance_type, zone, market, count)

    def mark_unsupported(self, instance_type: str, zone: str | None = None) -> None:
        """Make ``instance_type`` unsupported in ``zone`` (every zone when None).

        Launches of it there fail with AWS's ``Unsupported`` (HTTP 400 for RunInstances, an
        ``Errors`` entry for an instant fleet). :meth:`restore_capacity` does not undo it.

        Examples
        --------
        >>> cloud.mark_unsupported("m7g.large", "us-east-1e")          # doctest: +SKIP
        """
        self.capacity.set_unsupported(instance_type, zone)

    def restore_capacity(self) -> None:
        """Lift every capacity limit: later launches succeed again (a background retry
        that kept asking now gets its instances).

        Examples
        --------
        >>> cloud.set_capacity(market="spot")                          # doctest: +SKIP
        >>> cloud.restore_capacity()
        """
        self.capacity.restore()

    def interrupt(self, instance_id: str, delay: float = 5.0) -> None:
        """Deliver a spot interruption notice to an instance; terminate it after ``delay`` s."""
        self._runtime().interrupt(instance_id, delay)

    def console_output(self, instance_id: str) -> str:
        """Everything an instance's boot script printed so far."""
        return self._runtime().console_output(instance_id)

    def client_kwargs(self) -> dict[str, str]:
        """Keyword arguments for an aiobotocore/boto3 client of this cloud."""
        return {"endpoint_url": self.endpoint_url, "region_name": self.region, **CREDENTIALS}

    def _runtime(self) -> VMRuntime:
        if self.runtime is None:
            raise RuntimeError("LocalCloud is not started")
        return self.runtime

    def __repr__(self) -> str:
        where = self.endpoint_url if self._server is not None else "not started"
        return f"<LocalCloud {where} region={self.region}>"


def _shutdown(
    server: BaseWSGIServer,
    runtime: VMRuntime,
    account_id: str,
    workdir: Path | None,
    watchdog: Watchdog,
) -> None:
    runtime.close()
    server.shutdown()
    server.server_close()
    _forget_account(account_id)
    capacity.unregister(account_id)
    quotas.unregister(account_id)
    if workdir is not None:
        shutil.rmtree(workdir, ignore_errors=True)
    watchdog.release()  # everything is done: it has nothing left to do


def _forget_account(account_id: str) -> None:
    from moto.ec2.models import ec2_backends
    from moto.iam.models import iam_backends
    from moto.s3.models import s3_backends
    from moto.ssm.models import ssm_backends
    from moto.sts.models import sts_backends

    for backends in (ec2_backends, s3_backends, ssm_backends, iam_backends, sts_backends):
        backends.pop(account_id, None)


class _Middleware:
    """Routes IMDS and control requests; injects faults; pins the moto account; makes
    conditional writes atomic."""

    def __init__(self, cloud: LocalCloud, app: Any) -> None:
        self.cloud = weakref.proxy(cloud)
        self.app = app
        # moto checks S3's If-None-Match / If-Match and then writes, in two steps, and the
        # server runs a thread per request: two racing writes could both pass the check.
        # S3 lets one win (the other gets 412), and elections rely on it.
        self._conditional_writes = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path.startswith("/_imds/"):
            return imds.handle(
                environ, start_response, self.cloud._runtime().vms, self.cloud.imds_tokens
            )
        if path.startswith("/_localcloud/"):
            return _control(self.cloud, environ, start_response)
        environ["HTTP_X_MOTO_ACCOUNT_ID"] = self.cloud.account_id
        _, fault = faults.apply(self.cloud.faults, environ)
        if fault is not None:
            status, headers, body = faults.error_response(environ, fault)
            start_response(status, headers)
            return [body]
        conditional = "HTTP_IF_NONE_MATCH" in environ or "HTTP_IF_MATCH" in environ
        if environ.get("REQUEST_METHOD") == "PUT" and conditional:
            with self._conditional_writes:
                return list(strict.serve(self.cloud.strictness, environ, start_response, self.app))
        return strict.serve(self.cloud.strictness, environ, start_response, self.app)


def _control(
    cloud: LocalCloud, environ: dict[str, Any], start_response: StartResponse
) -> Iterable[bytes]:
    """``/_localcloud/<verb>``: the same operations as LocalCloud's methods, over HTTP."""
    verb = environ["PATH_INFO"].removeprefix("/_localcloud/")
    length = int(environ.get("CONTENT_LENGTH") or 0)
    args = json.loads(environ["wsgi.input"].read(length) or b"{}") if length else {}
    result: Any = {}
    if verb == "info":
        result = {
            "region": cloud.region,
            "account_id": cloud.account_id,
            "image": cloud.image.to_dict(),
        }
    elif verb == "calls":
        result = dict(cloud.calls)
    elif verb == "reset-calls":
        cloud.reset_calls()
    elif verb == "inject":
        cloud.inject(**args)
    elif verb == "clear-faults":
        cloud.clear_faults()
    elif verb == "interrupt":
        cloud.interrupt(**args)
    elif verb == "console-output":
        result = {"output": cloud.console_output(args["instance_id"])}
    elif verb == "requests":
        result = {"requests": cloud.requests(args["action"])}
    elif verb == "set-capacity":
        cloud.set_capacity(**args)
    elif verb == "mark-unsupported":
        cloud.mark_unsupported(**args)
    elif verb == "restore-capacity":
        cloud.restore_capacity()
    else:
        handled, result = strict.control(cloud, verb, args)
        if not handled:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"unknown local cloud control verb"]
    body = json.dumps(result).encode()
    start_response("200 OK", [("Content-Type", "application/json")])
    return [body]


class RemoteCloud(strict.RemoteStrictness):
    """Control a :class:`LocalCloud` running in another process, by its endpoint.

    Offers the test-facing methods of LocalCloud (``image``, ``inject``, ``calls``,
    ``reset_calls``, ``requests``, ``set_capacity``, ``mark_unsupported``,
    ``restore_capacity``, ``interrupt``, ``console_output``) over its control API.

    Examples
    --------
    >>> remote = RemoteCloud("http://127.0.0.1:4566")                 # doctest: +SKIP
    >>> remote.set_capacity("m6i.large", "us-east-1a", "on-demand", count=2)
    >>> remote.restore_capacity()
    """

    @classmethod
    @contextlib.contextmanager
    def standalone(cls, *options: str, stop_timeout: float = 120.0) -> Iterator[RemoteCloud]:
        """``dask-rawvm localcloud --port 0 *options`` in a process group of its own (it
        outlives a killed client), controlled from here; stopped (SIGTERM to its group) at
        the end, which it must survive with exit status 0.
        """
        command = [sys.executable, "-m", "dask_rawvm.cli", "localcloud", "--port", "0"]
        server = subprocess.Popen(
            [*command, *options], stdout=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            assert server.stdout is not None
            yield cls(server.stdout.readline().split("endpoint: ")[1].strip())
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            if server.wait(timeout=stop_timeout) != 0:
                raise RuntimeError(f"the local cloud exited with status {server.returncode}")

    def __init__(self, endpoint_url: str) -> None:
        self.endpoint_url = endpoint_url.rstrip("/")
        info = self._call("info")
        self.region = info["region"]
        self.image = Image.from_dict(info["image"])

    def _call(self, verb: str, **args: Any) -> Any:
        request = urllib.request.Request(
            f"{self.endpoint_url}/_localcloud/{verb}",
            data=json.dumps(args).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def inject(
        self,
        action: str,
        error: str | None = None,
        count: int = 1,
        latency: float = 0.0,
        message: str | None = None,
        status: int | None = None,
        after: int = 0,
    ) -> None:
        self._call(
            "inject",
            action=action,
            error=error,
            count=count,
            latency=latency,
            message=message,
            status=status,
            after=after,
        )

    def clear_faults(self) -> None:
        self._call("clear-faults")

    @property
    def calls(self) -> Counter[str]:
        return Counter(self._call("calls"))

    def reset_calls(self) -> None:
        self._call("reset-calls")

    def requests(self, action: str) -> list[dict[str, str]]:
        """See :meth:`LocalCloud.requests`."""
        return list(self._call("requests", action=action)["requests"])

    def set_capacity(
        self,
        instance_type: str | None = None,
        zone: str | None = None,
        market: str | None = None,
        count: int | None = 0,
    ) -> None:
        """See :meth:`LocalCloud.set_capacity`."""
        self._call(
            "set-capacity", instance_type=instance_type, zone=zone, market=market, count=count
        )

    def mark_unsupported(self, instance_type: str, zone: str | None = None) -> None:
        """See :meth:`LocalCloud.mark_unsupported`."""
        self._call("mark-unsupported", instance_type=instance_type, zone=zone)

    def restore_capacity(self) -> None:
        """See :meth:`LocalCloud.restore_capacity`."""
        self._call("restore-capacity")

    def interrupt(self, instance_id: str, delay: float = 5.0) -> None:
        self._call("interrupt", instance_id=instance_id, delay=delay)

    def console_output(self, instance_id: str) -> str:
        return str(self._call("console-output", instance_id=instance_id)["output"])

    def client_kwargs(self) -> dict[str, str]:
        return {"endpoint_url": self.endpoint_url, "region_name": self.region, **CREDENTIALS}
