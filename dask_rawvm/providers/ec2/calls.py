"""One EC2 or S3 call: throttling backed off, any failure a ProviderError carrying EC2's code.

Every call of the EC2 provider other than a launch goes through :func:`ec2_call` (launches
through :mod:`.fleet`, which also retries 5xx answers with the same ClientToken); the error
codes the provider decides by are read from botocore's parsed answer (:func:`error_code`),
never from a message.
"""

from __future__ import annotations

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


async def ec2_call(
    method: Callable[..., Awaitable[Any]],
    action: str,
    *,
    throttle_timeout: float = 120.0,
    service: str = "EC2",
    **params: Any,
) -> Any:
    """One call (not a launch): throttling backs off with full jitter until ``throttle_timeout``.

    Raises
    ------
    ProviderError
        Naming the action and the cause, with the service's error code in ``.code``.
    """
    try:
        return await retry(
            partial(method, **params),
            retryable=throttled,
            timeout=throttle_timeout,
            backoff=THROTTLE_BACKOFF,
            what=f"{service} {action}",
        )
    except ClientError as e:
        code = error_code(e)
        raise ProviderError(f"{service} {action} failed: {code}: {error_message(e)}", code) from e
    except BotoCoreError as e:
        raise ProviderError(f"{service} {action} failed: {e}") from e
