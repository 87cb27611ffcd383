"""One EC2 or S3 call: throttling backed off, any failure a ProviderError carrying EC2's code.

Every call of the EC2 provider other than a launch goes through :func:`ec2_call` (launches
through :mod:`.fleet`, which also retries 5xx answers with the same ClientToken), and every
listing through :func:`paginate`; the error codes the provider decides by are read from
botocore's parsed answer (:func:`error_code`), never from a message.

EC2 is eventually consistent: a call naming an instance, security group or launch template
made a moment ago may answer ``...NotFound`` (AWS's "Eventual consistency in the EC2 API").
Calls that name something just made pass ``settle=``: their NotFound is retried, with the
same backoff as throttling, for that long. A call refused for want of a permission names
the IAM action it needed.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dask_rawvm.backoff import Backoff, retry
from dask_rawvm.errors import ProviderError

#: EC2's answers to too many calls: back off and send again.
THROTTLING = frozenset({"RequestLimitExceeded", "Throttling", "ThrottlingException"})
#: Whole-call errors worth sending again unchanged (a ClientToken makes that safe).
TRANSIENT = frozenset({"InternalError", "InternalFailure", "Unavailable", "ServiceUnavailable"})
#: Backoff for throttled calls: 0.2 s doubling to 20 s, full jitter.
THROTTLE_BACKOFF = Backoff(0.2, 20.0)
#: EC2 takes at most 1000 ids per TerminateInstances / DescribeInstances call.
MAX_IDS_PER_CALL = 1000
#: How long something just made may stay unknown to calls naming it. AWS documents no bound
#: ("usually seconds"); a minute covers what is reported without hiding a real mistake long.
SETTLE_TIMEOUT = 60.0
#: A caller without the permission: EC2's code, and the one other services (and moto) use.
DENIED = frozenset({"UnauthorizedOperation", "AccessDenied", "AccessDeniedException"})
#: S3 API operations whose IAM action has another name (AWS's "Actions for Amazon S3").
_S3_ACTIONS = {
    "ListBuckets": "ListAllMyBuckets",
    "ListObjectsV2": "ListBucket",
    "ListObjects": "ListBucket",
    "HeadBucket": "ListBucket",
    "HeadObject": "GetObject",
    "DeleteObjects": "DeleteObject",
}
_SERVICE_PREFIX = {"EC2": "ec2", "S3": "s3", "SSM": "ssm", "IAM": "iam", "STS": "sts"}


def error_code(error: BaseException) -> str:
    """The cloud's error code of a botocore ClientError (``""`` for anything else)."""
    if isinstance(error, ClientError):
        return str(error.response.get("Error", {}).get("Code", ""))
    return ""


def error_message(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Message", ""))


def throttled(error: Exception) -> bool:
    """Whether EC2 refused a call for coming too often."""
    return error_code(error) in THROTTLING


def not_found(error: BaseException) -> bool:
    """Whether EC2 answered that something the call names does not exist (yet)."""
    code = error_code(error)
    return code.endswith(".NotFound") or code.endswith("NotFoundException")


def settling(settle: float) -> Callable[[Exception], bool]:
    """What to retry for a call naming things made within ``settle`` seconds: throttling,
    and NotFound for ``settle`` seconds from now."""
    until = time.monotonic() + settle
    return lambda e: throttled(e) or (not_found(e) and time.monotonic() < until)


def iam_action(service: str, action: str) -> str:
    """The IAM action an API call needs: ``ec2:DescribeSubnets``, ``s3:ListAllMyBuckets``."""
    prefix = _SERVICE_PREFIX.get(service, service.lower())
    if prefix == "s3":
        action = _S3_ACTIONS.get(action, action)
    return f"{prefix}:{action}"


def denied_message(service: str, action: str) -> str:
    """The cause and the fix of a call refused for want of a permission."""
    return (
        f"these credentials lack the permission {iam_action(service, action)}. Fix: add it to "
        "their IAM policy (`dask-rawvm iam-policy` prints every permission dask-rawvm needs)"
    )


async def ec2_call(
    method: Callable[..., Awaitable[Any]],
    action: str,
    *,
    throttle_timeout: float = 120.0,
    service: str = "EC2",
    settle: float = 0.0,
    **params: Any,
) -> Any:
    """One call (not a launch): throttling backs off with full jitter until ``throttle_timeout``.

    Parameters
    ----------
    method
        The aiobotocore client method.
    action
        The API action, for messages (``"DescribeSubnets"``).
    throttle_timeout
        How long to keep backing off throttling.
    service
        ``"EC2"``, ``"S3"``, ``"SSM"``...: for messages and the IAM action's prefix.
    settle
        Seconds a ``...NotFound`` is retried too: for calls naming something just made.
    **params
        The call's parameters.

    Raises
    ------
    ProviderError
        Naming the action and the cause (the IAM permission, when one was missing), with
        the service's error code in ``.code``.
    """
    try:
        return await retry(
            partial(method, **params),
            retryable=settling(settle) if settle else throttled,
            timeout=max(throttle_timeout, settle),
            backoff=THROTTLE_BACKOFF,
            what=f"{service} {action}",
        )
    except ClientError as e:
        code = error_code(e)
        cause = f" -- {denied_message(service, action)}" if code in DENIED else ""
        raise ProviderError(
            f"{service} {action} failed: {code}: {error_message(e)}{cause}", code
        ) from e
    except BotoCoreError as e:
        raise ProviderError(f"{service} {action} failed: {e}") from e


async def paginate(
    method: Callable[..., Awaitable[Any]],
    action: str,
    result_key: str,
    *,
    throttle_timeout: float = 120.0,
    service: str = "EC2",
    token: tuple[str, str] = ("NextToken", "NextToken"),
    **params: Any,
) -> list[Any]:
    """Every item of a listing, page after page (each page one :func:`ec2_call`).

    Parameters
    ----------
    result_key
        The answer's list (``"SecurityGroups"``).
    token
        The request's and the answer's names of the page token: EC2's ``NextToken``, S3
        ListBuckets' ``ContinuationToken``.
    """
    items: list[Any] = []
    request_token, answer_token = token
    paging: dict[str, Any] = {}
    while True:
        page = await ec2_call(
            method, action, throttle_timeout=throttle_timeout, service=service, **params, **paging
        )
        items += page.get(result_key) or []
        following = page.get(answer_token)
        if not following:
            return items
        paging = {request_token: following}
