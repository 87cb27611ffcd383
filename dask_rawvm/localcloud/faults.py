"""Fault and latency injection by API action, and a count of calls by action.

The local cloud wraps moto's WSGI app with :class:`FaultInjector`, so tests and
benchmarks can make the next *k* calls of an action fail with a real AWS error
code (and the HTTP status AWS uses for it), slow an action down, and see exactly
which calls a cluster made. It also keeps the parameters of the last query-protocol
(EC2) requests, so a test can read what a client sent, retries included.
"""

from __future__ import annotations

import io
import json
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs
from xml.sax.saxutils import escape

# The HTTP status AWS answers each error code with. It matters: botocore decides
# what to retry from it (ICE is a 500, which botocore would retry by default).
ERROR_STATUS = {
    "InsufficientInstanceCapacity": 500,
    "InternalError": 500,
    "RequestLimitExceeded": 503,
    "Unavailable": 503,
    "ServiceUnavailable": 503,
    "SpotMaxPriceTooLow": 400,
    "MaxSpotInstanceCountExceeded": 400,
    "InstanceLimitExceeded": 400,
    "VcpuLimitExceeded": 400,
    "Unsupported": 400,
    "UnauthorizedOperation": 403,
    "AuthFailure": 401,
}

#: EC2's message for an action the caller's policies do not allow (EC2 appends an encoded
#: authorization message, which ``sts decode-authorization-message`` reads).
UNAUTHORIZED_MESSAGE = "You are not authorized to perform this operation."

READ_ONLY_PREFIXES = ("Describe", "Get", "List", "Head")
#: Requests whose parameters are kept (the oldest are forgotten first).
REQUEST_LOG_SIZE = 500


def is_mutating(action: str) -> bool:
    """Whether an API action changes cloud state (and so costs quota or money)."""
    name = action.split(":", 1)[-1]
    return not name.startswith(READ_ONLY_PREFIXES) and not action.startswith("s3:GET")


@dataclass
class Fault:
    """What happens to the next ``count`` calls of one action."""

    error: str | None = None
    count: int = 1
    latency: float = 0.0
    message: str | None = None
    status: int | None = None
    #: Calls to let through before the fault applies.
    after: int = 0


class FaultInjector:
    """Thread-safe registry of injected faults, and counts of calls by action."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._faults: dict[str, list[Fault]] = {}
        self._latency: dict[str, float] = {}
        self._calls: Counter[str] = Counter()
        self._requests: deque[tuple[str, dict[str, str]]] = deque(maxlen=REQUEST_LOG_SIZE)
        self._denied: set[str] = set()

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
        """Make the next ``count`` calls of ``action`` fail with ``error``, once ``after``
        calls went through (``after=1``: the second call of a pass fails, not the first).

        With ``error=None`` and ``latency`` set, every later call of ``action``
        is delayed by ``latency`` seconds until :meth:`clear`.
        """
        with self._lock:
            if error is None:
                self._latency[action] = latency
                return
            fault = Fault(error, count, latency, message, status, after)
            self._faults.setdefault(action, []).append(fault)

    def deny(self, action: str, denied: bool = True) -> None:
        """Answer every later call of ``action`` as EC2 answers a caller without the
        permission (``UnauthorizedOperation``, HTTP 403), until ``deny(action, False)``
        or :meth:`clear`."""
        with self._lock:
            if denied:
                self._denied.add(action)
            else:
                self._denied.discard(action)

    def clear(self) -> None:
        """Forget every injected fault, latency and denial."""
        with self._lock:
            self._faults.clear()
            self._latency.clear()
            self._denied.clear()

    @property
    def calls(self) -> Counter[str]:
        """A copy of the call counts by action."""
        with self._lock:
            return Counter(self._calls)

    def reset_calls(self) -> None:
        """Forget the call counts and the logged requests."""
        with self._lock:
            self._calls.clear()
            self._requests.clear()

    def requests(self, action: str) -> list[dict[str, str]]:
        """The parameters of the last requests of ``action``, oldest first, faulted ones too.

        Parameters are flat, as on the wire: ``{"ClientToken": "...",
        "TargetCapacitySpecification.TotalTargetCapacity": "10", ...}``.
        """
        with self._lock:
            return [dict(params) for name, params in self._requests if name == action]

    def record(
        self, action: str, params: dict[str, str] | None = None
    ) -> tuple[float, Fault | None]:
        """Count one call (and log its parameters); return the latency to add and the
        fault to raise, if any."""
        with self._lock:
            self._calls[action] += 1
            if params is not None:
                self._requests.append((action, params))
            latency = self._latency.get(action, 0.0)
            if action in self._denied:
                return latency, Fault("UnauthorizedOperation", message=UNAUTHORIZED_MESSAGE)
            queue = self._faults.get(action)
            if not queue:
                return latency, None
            fault = queue[0]
            if fault.after > 0:
                fault.after -= 1
                return latency, None
            fault.count -= 1
            if fault.count <= 0:
                queue.pop(0)
            return latency + fault.latency, fault


def action_of(environ: dict[str, Any]) -> str:
    """The API action of a request, for the query (EC2), JSON (SSM) and REST (S3) protocols.

    Reads a form body if there is one and puts it back so moto can read it again.
    """
    return _action_and_params(environ)[0]


def request_of(environ: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
    """The action and the flat parameters of a query-protocol request (None otherwise)."""
    return _action_and_params(environ)


def _action_and_params(environ: dict[str, Any]) -> tuple[str, dict[str, str] | None]:
    """The action, and the flat parameters of a query-protocol request (None otherwise)."""
    target = environ.get("HTTP_X_AMZ_TARGET")
    if target:
        return target.rsplit(".", 1)[-1], None
    query = parse_qs(environ.get("QUERY_STRING", ""))
    if "Action" in query:
        return query["Action"][0], _flat(query)
    if environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        environ["wsgi.input"] = io.BytesIO(body)
        form = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        if "Action" in form:
            return form["Action"][0], _flat(form)
    return f"s3:{environ.get('REQUEST_METHOD', 'GET')}", None


def _flat(parsed: dict[str, list[str]]) -> dict[str, str]:
    return {name: values[0] for name, values in parsed.items()}


def ec2_error_body(code: str, message: str) -> bytes:
    """An EC2 (query protocol) error document, as botocore parses it."""
    return (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Response><Errors><Error><Code>{escape(code)}</Code>"
        f"<Message>{escape(message)}</Message></Error></Errors>"
        f"<RequestID>{uuid.uuid4()}</RequestID></Response>"
    ).encode()


def error_response(
    environ: dict[str, Any], fault: Fault
) -> tuple[str, list[tuple[str, str]], bytes]:
    """An AWS-shaped error: XML for the query protocol, JSON for the JSON protocol."""
    assert fault.error is not None
    status = fault.status or ERROR_STATUS.get(fault.error, 400)
    message = fault.message or f"Injected by the local cloud: {fault.error}"
    if environ.get("HTTP_X_AMZ_TARGET"):
        body = json.dumps({"__type": fault.error, "message": message}).encode()
        content_type = "application/x-amz-json-1.1"
    else:
        body = ec2_error_body(fault.error, message)
        content_type = "text/xml"
    headers = [("Content-Type", content_type), ("Content-Length", str(len(body)))]
    return f"{status} Injected", headers, body


def apply(injector: FaultInjector, environ: dict[str, Any]) -> tuple[str, Fault | None]:
    """Count the call, sleep its injected latency, and return (action, fault or None)."""
    action, params = _action_and_params(environ)
    latency, fault = injector.record(action, params)
    if latency:
        time.sleep(latency)
    if fault is not None and fault.error is None:
        fault = None
    return action, fault
