"""What tasks on the VMs read: the client's AWS identity and its small local files.

Forwarded credentials (``credentials="forward"``) reach each VM's Dask process in a plugin
sent over the cluster's TLS connection, never in user-data, a launch template or the
cluster's bucket. On the VM, a :class:`CredentialEndpoint` in the Dask process serves them
where every AWS SDK looks for refreshable credentials: the container-credentials endpoint
(``AWS_CONTAINER_CREDENTIALS_FULL_URI`` with ``AWS_CONTAINER_AUTHORIZATION_TOKEN``, the
variables ECS sets), which boto3, s3fs (aiobotocore), pyarrow's S3 filesystem and the AWS
CLI read, and re-read before the credentials expire. The boot script chooses the
endpoint's loopback port and a random token before the Dask process starts (SDKs read the
variables at start); botocore accepts a full URI only on a loopback address or ECS's own.

Small local files (``files=``, ``cluster.upload``) travel the same way: a worker plugin
holding an archive, unpacked into the worker's working directory by every worker,
including those that join later (the scheduler hands its plugins to each new worker before
it runs a task).

Imported on the VMs: the standard library and distributed, nothing else of dask_rawvm's
but its errors.
"""

from __future__ import annotations

import datetime
import hmac
import io
import json
import logging
import os
import tarfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from dask_rawvm.errors import OptionError

logger = logging.getLogger(__name__)

#: The variables AWS SDKs read refreshable credentials from (botocore's ContainerProvider).
ENDPOINT_VARIABLE = "AWS_CONTAINER_CREDENTIALS_FULL_URI"
TOKEN_VARIABLE = "AWS_CONTAINER_AUTHORIZATION_TOKEN"
#: Set by the boot script: this process serves the endpoint those variables name (a client
#: running inside ECS has them too, pointing at ECS's agent: not ours to serve).
SERVE_VARIABLE = "RAWVM_CREDENTIALS_ENDPOINT"
#: The name both credential plugins register under: a new one replaces the old.
CREDENTIALS_PLUGIN = "dask-rawvm-credentials"
#: ``files=`` in all, at most. The archive lives in the scheduler's memory and goes to each
#: worker in its registration message: small files (lookup tables, configs), not datasets,
#: which belong in S3.
FILES_LIMIT = 10 * 2**20


@dataclass(frozen=True)
class ForwardedCredentials:
    """Short-lived AWS credentials, as the container-credentials endpoint serves them."""

    access_key_id: str
    secret_access_key: str = field(repr=False)
    token: str | None = field(repr=False)
    expiration: datetime.datetime

    def __post_init__(self) -> None:
        # In the standard library's UTC: botocore parses STS's answer with dateutil's tzutc,
        # and a VM whose environment has no python-dateutil could not unpickle that (its
        # worker then fails to start).
        utc = self.expiration.astimezone(datetime.timezone.utc)
        object.__setattr__(self, "expiration", utc)

    def expires_in(self) -> float:
        """Seconds from now until they expire."""
        now = datetime.datetime.now(datetime.timezone.utc)
        return (self.expiration - now).total_seconds()

    def to_json(self) -> bytes:
        """The endpoint's answer: the fields botocore's ``ContainerMetadataFetcher`` reads."""
        answer = {
            "AccessKeyId": self.access_key_id,
            "SecretAccessKey": self.secret_access_key,
            "Expiration": self.expiration.astimezone(datetime.timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%SZ"
            ),
        }
        if self.token:
            answer["Token"] = self.token
        return json.dumps(answer).encode()


class CredentialEndpoint:
    """The container-credentials endpoint of this process: one per process, on loopback.

    Parameters
    ----------
    url
        ``http://127.0.0.1:<port>/<path>``, as ``AWS_CONTAINER_CREDENTIALS_FULL_URI`` says.
    token
        What a request's ``Authorization`` header must be (``AWS_CONTAINER_AUTHORIZATION_TOKEN``):
        another user's process on the VM cannot read the credentials.
    """

    _serving: ClassVar[CredentialEndpoint | None] = None
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, url: str, token: str) -> None:
        parsed = urllib.parse.urlsplit(url)
        if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
            raise ValueError(f"{ENDPOINT_VARIABLE}={url!r} is not a loopback URL with a port")
        self.path = parsed.path or "/"
        self.token = token
        self.credentials: ForwardedCredentials | None = None
        self.server = ThreadingHTTPServer(("127.0.0.1", parsed.port), _handler(self))
        self.server.daemon_threads = True
        # A thread of its own: an SDK call blocking the event loop's thread still gets an answer.
        threading.Thread(
            target=self.server.serve_forever, name="dask-rawvm-credentials", daemon=True
        ).start()

    @classmethod
    def of_this_process(cls) -> CredentialEndpoint | None:
        """The endpoint this process serves, started on first use; None where the boot
        script set none up (a client's process, an in-process scheduler, SSH hosts)."""
        url, token = os.environ.get(ENDPOINT_VARIABLE), os.environ.get(TOKEN_VARIABLE)
        if not os.environ.get(SERVE_VARIABLE) or not url or not token:
            return None
        with cls._lock:
            if cls._serving is None:
                cls._serving = cls(url, token)
            return cls._serving

    def update(self, credentials: ForwardedCredentials) -> None:
        """Serve ``credentials`` from now on."""
        self.credentials = credentials

    def answer(self, path: str, authorization: str | None) -> tuple[int, bytes]:
        """The status and body of a request for ``path``."""
        if urllib.parse.urlsplit(path).path != self.path:
            return 404, b'{"message": "not found"}'
        if authorization is None or not hmac.compare_digest(authorization, self.token):
            return 403, b'{"message": "wrong or missing authorization token"}'
        credentials = self.credentials
        if credentials is None:
            return 503, b'{"message": "no credentials forwarded yet"}'
        return 200, credentials.to_json()


def _handler(endpoint: CredentialEndpoint) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # http.server's name for it
            status, body = endpoint.answer(self.path, self.headers.get("Authorization"))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # one line per SDK refresh
            pass

    return Handler


def serve(credentials: ForwardedCredentials) -> bool:
    """Serve ``credentials`` on this process's endpoint; False where it has none."""
    endpoint = CredentialEndpoint.of_this_process()
    if endpoint is None:
        return False
    endpoint.update(credentials)
    return True


class WorkerCredentials(WorkerPlugin):
    """Forwarded credentials for a worker: served before it runs its first task."""

    name = CREDENTIALS_PLUGIN

    def __init__(self, credentials: ForwardedCredentials) -> None:
        self.credentials = credentials

    def setup(self, worker: Any) -> None:
        serve(self.credentials)

    def teardown(self, worker: Any) -> None:
        # Replaced by newer credentials (same name): the endpoint keeps serving, the next
        # plugin's setup updates it.
        pass


class SchedulerCredentials(SchedulerPlugin):
    """Forwarded credentials for the scheduler VM's process."""

    name = CREDENTIALS_PLUGIN

    def __init__(self, credentials: ForwardedCredentials) -> None:
        self.credentials = credentials

    async def start(self, scheduler: Any) -> None:
        # Each refresh registers a new plugin under the same name; the old one has nothing
        # to stop, and taking it out first spares the scheduler's "overwriting" warning.
        scheduler.plugins.pop(CREDENTIALS_PLUGIN, None)
        serve(self.credentials)


# -- small local files -----------------------------------------------------------------------
def pack_files(paths: list[str], base: str | None = None) -> bytes:
    """A gzipped tar of ``paths`` (files or directories) as each VM unpacks it.

    A path under ``base`` (the current directory by default) keeps its path relative to
    it, so ``open("data/lookup.csv")`` in a task finds what it finds here; any other path
    goes in by its name.

    Raises
    ------
    OptionError
        For a path that does not exist, or more than :data:`FILES_LIMIT` bytes in all.
    """
    root = Path(base or os.getcwd()).resolve()
    members: list[tuple[Path, str]] = []
    for given in paths:
        path = Path(given).expanduser()
        path = (root / path if not path.is_absolute() else path).resolve()
        if not path.exists():
            raise OptionError(f"files: {given!r} does not exist (looked at {path})")
        arcname = str(path.relative_to(root)) if path.is_relative_to(root) else path.name
        members.append((path, arcname))
    total = sum(_size(path) for path, _ in members)
    if total > FILES_LIMIT:
        raise OptionError(
            f"files: {', '.join(paths)} hold {total / 2**20:.1f} MiB, over the "
            f"{FILES_LIMIT // 2**20} MiB files= ships to every worker: put bigger data in S3 "
            "(see the README's 'Your data') and read it from there"
        )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path, arcname in members:
            archive.add(path, arcname=arcname)
    return buffer.getvalue()


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


class ShippedFiles(WorkerPlugin):
    """Small local files, unpacked into the worker's working directory at its start.

    Parameters
    ----------
    archive
        From :func:`pack_files`.
    """

    def __init__(self, archive: bytes) -> None:
        self.archive = archive

    def setup(self, worker: Any) -> None:
        with tarfile.open(fileobj=io.BytesIO(self.archive), mode="r:gz") as archive:
            # "data": no absolute paths, no member leaving the directory, no devices.
            archive.extractall(os.getcwd(), filter="data")
