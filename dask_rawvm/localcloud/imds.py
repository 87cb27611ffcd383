"""An instance-metadata (IMDSv2) stub for the local cloud's VMs.

Served under ``/_imds/<instance-id>/`` on the local cloud's endpoint; the VM
gets that prefix in ``RAWVM_IMDS``. On EC2 the same paths live at
``http://169.254.169.254/``, so one bootstrap script serves both.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable
from typing import Any

from dask_rawvm.localcloud.runtime import VM, decode_user_data, instance_document

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


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
        "tags/instance": "\n".join(sorted(tags)),
    }
    if key in simple:
        return simple[key]
    if key.startswith("tags/instance/"):
        return tags.get(key.removeprefix("tags/instance/"))
    if key == "spot/instance-action" and vm.instance_action is not None:
        return json.dumps(vm.instance_action)
    return None


def handle(
    environ: dict[str, Any], start_response: StartResponse, vms: dict[str, VM]
) -> Iterable[bytes]:
    """Answer one IMDS request for the VM named in the path."""
    parts = environ.get("PATH_INFO", "").split("/", 3)  # "", "_imds", id, rest
    vm = vms.get(parts[2]) if len(parts) > 2 else None
    rest = parts[3] if len(parts) > 3 else ""
    method = environ.get("REQUEST_METHOD", "GET")
    if vm is None:
        return _reply(start_response, "404 Not Found", "unknown instance")
    if rest == "latest/api/token" and method == "PUT":
        return _reply(start_response, "200 OK", vm.token)
    if environ.get("HTTP_X_AWS_EC2_METADATA_TOKEN") != vm.token:
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
