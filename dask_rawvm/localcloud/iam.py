"""IAM as EC2 enforces it, on a local cloud: identities holding a policy, and nothing more.

moto checks every request against the caller's IAM policies once its
``INITIAL_NO_AUTH_ACTION_COUNT`` is reached; :func:`enforce` sets it to 0. That setting is
**process-global** in moto: every local cloud of the process, and every moto user in it,
is enforced from then on, so run an enforcing cloud in a process of its own
(``dask-rawvm localcloud``, then :meth:`RemoteCloud.enforce_iam`).

moto's S3 cannot authorize a presigned URL or POST form (it reads the ``Authorization``
header, which they have not, and fails with an internal error); :func:`enforce` installs a
check for those: the signing access key must exist and hold the permission, and the URL or
the form's policy must not have expired. Its signature is not recomputed. moto also checks
every IAM action against the resource ``"*"``; :func:`enforce` makes it the role or
instance profile the call names, as IAM does, so a policy confined to a path is held to
that path. EC2 checks ``iam:PassRole`` on the role of a launch's instance profile
(:func:`check_pass_role`).

The local cloud's VMs get the credentials of their instance profile's role from its
metadata service as EC2's do (:func:`role_credentials`): moto's STS assumes the role, so
an enforcing cloud holds what the VMs do to the role's policy.
"""

from __future__ import annotations

import base64
import json
import threading
from datetime import datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qs, urlparse

_LOCK = threading.Lock()
_HOOKED = False


def create_identity(account_id: str, name: str, policy: dict[str, Any]) -> dict[str, str]:
    """An IAM user of ``account_id`` whose only permissions are ``policy``; its access key.

    Returns
    -------
    dict
        ``aws_access_key_id`` and ``aws_secret_access_key``, for a botocore client.
    """
    from moto.iam.models import iam_backends

    backend = iam_backends[account_id]["aws"]
    backend.create_user("us-east-1", name)
    backend.put_user_policy(name, f"{name}-policy", json.dumps(policy))
    key = backend.create_access_key(name)
    return {
        "aws_access_key_id": key.access_key_id,
        "aws_secret_access_key": key.secret_access_key,
    }


def enforce() -> None:
    """Check every later request of this process against its caller's IAM policies."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    _install_presigned_check()
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0


def _install_presigned_check() -> None:
    global _HOOKED
    with _LOCK:
        if _HOOKED:
            return
        from moto.core.authorization import ActionAuthenticatorMixin

        authorize = ActionAuthenticatorMixin._authenticate_and_authorize_action

        def hooked(self: Any, iam_request_cls: type, resource: str = "*") -> None:
            if resource == "*" and getattr(self, "service_name", None) == "iam":
                resource = _iam_resource(self)
            if "Authorization" in self.headers:
                return authorize(self, iam_request_cls, resource)
            query = parse_qs(urlparse(self.uri).query)
            form = {k.lower(): v for k, v in getattr(self, "querystring", {}).items()}
            if "X-Amz-Credential" not in query and "x-amz-credential" in form:
                from moto import settings

                if ActionAuthenticatorMixin.request_count >= settings.INITIAL_NO_AUTH_ACTION_COUNT:
                    _authorize_presigned_post(self, form, resource)
                    return None
                return authorize(self, iam_request_cls, resource)
            if "X-Amz-Credential" not in query:
                return authorize(self, iam_request_cls, resource)
            from moto import settings

            if ActionAuthenticatorMixin.request_count < settings.INITIAL_NO_AUTH_ACTION_COUNT:
                return authorize(self, iam_request_cls, resource)
            _authorize_presigned(self, query, resource)
            return None

        ActionAuthenticatorMixin._authenticate_and_authorize_action = hooked  # type: ignore[method-assign]
        _HOOKED = True


def _iam_resource(response: Any) -> str:
    """The ARN an IAM call is authorized on: the instance profile, else the role it names
    (with its path, as it exists or as CreateRole gives it); ``"*"`` for the others."""
    from moto.iam.models import iam_backends

    backend = iam_backends[response.current_account]["aws"]
    account = response.current_account
    profile = response._get_param("InstanceProfileName")
    role = response._get_param("RoleName")
    path = response._get_param("Path") or "/"
    if profile:
        found = backend.instance_profiles.get(profile)
        return f"arn:aws:iam::{account}:instance-profile{found.path if found else path}{profile}"
    if role:
        known = next((r for r in backend.roles.values() if r.name == role), None)
        return f"arn:aws:iam::{account}:role{known.path if known else path}{role}"
    return "*"


def enforcing() -> bool:
    """Whether requests are checked against their callers' policies now (:func:`enforce`)."""
    from moto import settings
    from moto.core.authorization import ActionAuthenticatorMixin

    return ActionAuthenticatorMixin.request_count >= settings.INITIAL_NO_AUTH_ACTION_COUNT


def check_pass_role(response: Any, role_arns: list[str]) -> str | None:
    """Why EC2 refuses a launch that gives instances these roles: the caller may not
    ``iam:PassRole`` them (None when it may, or when IAM is not enforced)."""
    if not role_arns or not enforcing():
        return None
    authorization = response.headers.get("Authorization", "")
    access_key_id = authorization.split("Credential=", 1)[-1].split("/", 1)[0]
    for arn in role_arns:
        if not _permitted(response, access_key_id, dict(response.headers), "iam:PassRole", arn):
            return f"You are not authorized to perform: iam:PassRole on resource: {arn}"
    return None


#: How long the role credentials an instance's metadata serves last (EC2: about an hour).
ROLE_SESSION_SECONDS = 3600


def role_credentials(account_id: str, role_arn: str, session: str) -> dict[str, str]:
    """Credentials of ``role_arn`` for one instance, as EC2's metadata service serves them
    (``iam/security-credentials/<role>``): moto's STS assumes the role for an hour."""
    from moto.sts.models import sts_backends

    assumed = sts_backends[account_id]["aws"].assume_role(
        region_name="us-east-1",
        role_session_name=session,
        role_arn=role_arn,
        policy="",
        duration=ROLE_SESSION_SECONDS,
        external_id="",
    )
    return {
        "Code": "Success",
        "LastUpdated": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "Type": "AWS-HMAC",
        "AccessKeyId": assumed.access_key_id,
        "SecretAccessKey": assumed.secret_access_key,
        "Token": assumed.session_token,
        "Expiration": assumed.expiration.strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def _permitted(
    response: Any, access_key_id: str, headers: dict[str, str], action: str, resource: str
) -> bool:
    """Whether the key's policies allow ``action`` on ``resource`` (an unknown key: no)."""
    from moto.iam.access_control import (
        CreateAccessKeyFailure,
        IAMPolicy,
        PermissionResult,
        create_access_key,
    )

    try:
        key = create_access_key(
            account_id=response.current_account,
            partition="aws",
            access_key_id=access_key_id,
            headers=headers,
        )
    except CreateAccessKeyFailure:
        return False
    permitted = False
    for policy in key.collect_policies():
        result = IAMPolicy(policy).is_action_permitted(action, resource)
        if result == PermissionResult.DENIED:
            return False
        permitted = permitted or result == PermissionResult.PERMITTED
    return permitted


def _authorize_presigned_post(response: Any, form: dict[str, list[str]], resource: str) -> None:
    """A presigned POST (an upload form): a known key allowed ``s3:PutObject`` on the
    form's key, and a policy that has not expired."""
    from moto.s3.exceptions import S3AccessDeniedError

    fields = {k: v[0] for k, v in form.items()}
    policy = json.loads(base64.b64decode(fields.get("policy", "")) or b"{}")
    expiration = policy.get("expiration", "1970-01-01T00:00:00Z").replace("Z", "+00:00")
    if datetime.now(timezone.utc) > datetime.fromisoformat(expiration):
        raise S3AccessDeniedError()
    headers = {}
    if "x-amz-security-token" in fields:
        headers["X-Amz-Security-Token"] = fields["x-amz-security-token"]
    access_key_id = fields["x-amz-credential"].split("/")[0]
    target = f"{resource}/{fields.get('key', '')}"
    if not _permitted(response, access_key_id, headers, "s3:PutObject", target):
        raise S3AccessDeniedError()


def _authorize_presigned(response: Any, query: dict[str, list[str]], resource: str) -> None:
    """A presigned request: an existing key, not expired, allowed the action on the resource."""
    from moto.iam.access_control import CreateAccessKeyFailure, create_access_key
    from moto.s3.exceptions import S3AccessDeniedError, S3InvalidAccessKeyIdError

    credential = query["X-Amz-Credential"][0].split("/")
    signed = datetime.strptime(query["X-Amz-Date"][0], "%Y%m%dT%H%M%SZ").replace(
        tzinfo=timezone.utc
    )
    expires = timedelta(seconds=int(query.get("X-Amz-Expires", ["0"])[0]))
    if datetime.now(timezone.utc) > signed + expires:
        raise S3AccessDeniedError()  # S3: "Request has expired", 403 AccessDenied
    headers = {}
    if "X-Amz-Security-Token" in query:
        headers["X-Amz-Security-Token"] = query["X-Amz-Security-Token"][0]
    try:
        create_access_key(
            account_id=response.current_account,
            partition="aws",
            access_key_id=credential[0],
            headers=headers,
        )
    except CreateAccessKeyFailure:
        raise S3InvalidAccessKeyIdError() from None
    action = f"{credential[3]}:{response._get_action()}"
    if not _permitted(response, credential[0], headers, action, resource):
        raise S3AccessDeniedError()
