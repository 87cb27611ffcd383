"""An instance-metadata (IMDSv2) stub for the local cloud's VMs.

Served under ``/_imds/<instance-id>/`` on the local cloud's endpoint; the VM
gets that prefix in ``RAWVM_IMDS``. On EC2 the same paths live at
``http://169.254.169.254/``, so one bootstrap script serves both.

As on EC2: a session token comes from ``PUT latest/api/token`` with a TTL of 1 to 21600 s
(``X-aws-ec2-metadata-token-ttl-seconds``; anything else is a 400), every other request
needs a token of that instance that has not expired (401 otherwise), and ``tags/instance``
answers only for instances launched with ``InstanceMetadataTags`` enabled, and
``iam/security-credentials/<role>`` only for instances with an instance profile: its role's
credentials, valid an hour and renewed a quarter of an hour before they expire
(:func:`~dask_rawvm.localcloud.iam.role_credentials`). A test can cap token lifetimes
(:attr:`Tokens.max_ttl`) to see a watcher outlive its token in seconds rather than hours.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from dask_rawvm.localcloud.iam import ROLE_SESSION_SECONDS, role_credentials
from dask_rawvm.localcloud.runtime import VM, decode_user_data, instance_document

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

#: The longest token EC2's metadata service issues, in seconds (6 hours).
MAX_TOKEN_TTL = 21600


class Tokens:
    """IMDSv2 session tokens of one local cloud's instances, and when each expires."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: dict[str, tuple[str, float]] = {}  # token -> (instance id, expiry)
        #: Tokens live at most this many seconds whatever TTL was asked for (a strict
        #: cloud's compressed clock); None: the TTL asked for, as on EC2.
        self.max_ttl: float | None = None

    def issue(self, instance_id: str, ttl: float) -> str:
        """A new token for ``instance_id`` that expires after ``ttl`` s (capped by max_ttl)."""
        if self.max_ttl is not None:
            ttl = min(ttl, self.max_ttl)
        token = os.urandom(24).hex()
        now = time.monotonic()
        with self._lock:
            # Forget expired tokens as new ones come: a VM refreshing for hours stays small.
            self._tokens = {t: v for t, v in self._tokens.items() if v[1] > now}
            self._tokens[token] = (instance_id, now + ttl)
        return token

    def valid(self, instance_id: str, token: str | None) -> bool:
        """Whether ``token`` is a live token of ``instance_id``."""
        with self._lock:
            found = self._tokens.get(token or "")
        return found is not None and found[0] == instance_id and found[1] > time.monotonic()


#: Credentials are renewed this long before they expire, as EC2's metadata service does.
RENEW_BEFORE = 900.0
_role_credentials: dict[str, tuple[dict[str, str], float]] = {}  # instance -> (answer, renew at)
_role_lock = threading.Lock()


def _profile(vm: VM) -> Any:
    """The instance profile the instance was launched with (moto's), or None."""
    associations = getattr(vm.instance.ec2_backend, "iam_instance_profile_associations", {})
    association = associations.get(vm.instance.id)
    return association.iam_instance_profile if association is not None else None


def _iam(vm: VM, key: str) -> str | None:
    """``iam/info`` and ``iam/security-credentials/[role]`` of an instance with a profile."""
    profile = _profile(vm)
    if profile is None or not profile.roles:
        return None
    role = profile.roles[0]
    if key == "iam/info":
        info = {
            "Code": "Success",
            "InstanceProfileArn": profile.arn,
            "InstanceProfileId": profile.id,
        }
        return json.dumps(info)
    if key == "iam/security-credentials/":
        return str(role.name)
    if key != f"iam/security-credentials/{role.name}":
        return None
    now = time.monotonic()
    with _role_lock:
        cached = _role_credentials.get(vm.instance.id)
        if cached is None or cached[1] <= now:
            answer = role_credentials(vm.instance.ec2_backend.account_id, role.arn, vm.instance.id)
            cached = (answer, now + ROLE_SESSION_SECONDS - RENEW_BEFORE)
            _role_credentials[vm.instance.id] = cached
    return json.dumps(cached[0])


def _metadata(vm: VM, key: str) -> str | None:
    instance = vm.instance
    tags = (
        {t["key"]: t["value"] for t in instance.get_tags()} if hasattr(instance, "get_tags") else {}
    )
    simple = {
        "instance-id": instance.id,
        "ami-id": instance.image_id,
        "ami-launch-index": str(instance.ami_launch_index),
        "instance-type": instance.instance_type,
        "local-ipv4": vm.ip,
        "public-ipv4": vm.ip,
        "hostname": vm.ip,
        "placement/availability-zone": instance.availability_zone or "",
        "placement/region": instance.region_name,
        "instance-life-cycle": "spot" if instance.lifecycle == "spot" else "on-demand",
    }
    if key in simple:
        return simple[key]
    options = getattr(instance, "metadata_options", None)
    if getattr(options, "instance_metadata_tags", "disabled") == "enabled":
        # EC2 serves tags only to instances launched with InstanceMetadataTags enabled.
        if key == "tags/instance":
            return "\n".join(sorted(tags))
        if key.startswith("tags/instance/"):
            return tags.get(key.removeprefix("tags/instance/"))
    if key == "spot/instance-action" and vm.instance_action is not None:
        return json.dumps(vm.instance_action)
    if key.startswith("iam/"):
        return _iam(vm, key)
    return None


def handle(
    environ: dict[str, Any], start_response: StartResponse, vms: dict[str, VM], tokens: Tokens
) -> Iterable[bytes]:
    """Answer one IMDS request for the VM named in the path."""
    parts = environ.get("PATH_INFO", "").split("/", 3)  # "", "_imds", id, rest
    vm = vms.get(parts[2]) if len(parts) > 2 else None
    rest = parts[3] if len(parts) > 3 else ""
    method = environ.get("REQUEST_METHOD", "GET")
    if vm is None:
        return _reply(start_response, "404 Not Found", "unknown instance")
    instance_id = vm.instance.id
    if rest == "latest/api/token" and method == "PUT":
        ttl = environ.get("HTTP_X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS", "")
        if not ttl.isdigit() or not 1 <= int(ttl) <= MAX_TOKEN_TTL:
            return _reply(start_response, "400 Bad Request", "Missing or invalid TTL")
        return _reply(start_response, "200 OK", tokens.issue(instance_id, int(ttl)))
    if not tokens.valid(instance_id, environ.get("HTTP_X_AWS_EC2_METADATA_TOKEN")):
        return _reply(start_response, "401 Unauthorized", "IMDSv2 token required")
    if rest == "latest/user-data":
        return _reply(start_response, "200 OK", decode_user_data(vm.instance.user_data))
    if rest == "latest/dynamic/instance-identity/document":
        return _reply(start_response, "200 OK", instance_document(vm))
    value = _metadata(vm, rest.removeprefix("latest/meta-data/"))
    if value is None:
        return _reply(start_response, "404 Not Found", "Not Found")
    return _reply(start_response, "200 OK", value)


def _reply(start_response: StartResponse, status: str, text: str) -> list[bytes]:
    body = text.encode()
    start_response(status, [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]
