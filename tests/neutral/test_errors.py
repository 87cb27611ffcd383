"""One error base the user can catch, the cloud's code kept on the exception, one backoff."""

from __future__ import annotations

import time

import pytest

from dask_rawvm import (
    BudgetExceeded,
    CatalogError,
    OptionError,
    ProviderError,
    RawVMError,
    UnknownOptionError,
)
from dask_rawvm.backoff import Backoff, retry
from dask_rawvm.config import resolve_options
from dask_rawvm.environment import EnvironmentTranslationError
from dask_rawvm.needs import Needs, check_spot_policy, markets_of
from dask_rawvm.providers.ec2.fleet import FleetLaunchError
from dask_rawvm.providers.ec2.security_groups import PublicAddressError

FAST = Backoff(0.001, 0.01)


@pytest.mark.parametrize(
    ("error", "second_base"),
    [
        (ProviderError, RuntimeError),
        (FleetLaunchError, RuntimeError),
        (BudgetExceeded, RuntimeError),
        (PublicAddressError, RuntimeError),
        (CatalogError, ValueError),
        (OptionError, ValueError),
        (EnvironmentTranslationError, ValueError),
        (UnknownOptionError, TypeError),
    ],
)
def test_every_error_is_a_rawvm_error_and_keeps_its_old_base(
    error: type[Exception], second_base: type[Exception]
) -> None:
    assert issubclass(error, RawVMError) and issubclass(error, second_base)


def test_option_errors_are_rawvm_errors() -> None:
    with pytest.raises(OptionError, match="spot_policy='cheap' is not one of"):
        resolve_options(spot_policy="cheap")
    with pytest.raises(UnknownOptionError, match="worker_vm_typo"):
        resolve_options(worker_vm_typo="x")
    with pytest.raises(CatalogError, match="at least 1 vCPU"):
        Needs(cpu=0)


def test_the_provider_s_code_is_kept() -> None:
    error = ProviderError("EC2 CreateFleet failed: ...", code="InsufficientInstanceCapacity")
    assert error.code == "InsufficientInstanceCapacity"
    assert ProviderError("no code").code is None


def test_one_vocabulary_of_markets() -> None:
    assert markets_of("spot_with_fallback") == ("spot", "on-demand")
    assert markets_of("on-demand") == ("on-demand",)
    assert markets_of("cheap") == ()  # options are checked where they are read
    assert check_spot_policy("spot") == "spot"


async def test_retry_backs_off_until_it_succeeds() -> None:
    attempts = []

    async def flaky() -> str:
        attempts.append(time.monotonic())
        if len(attempts) < 3:
            raise ConnectionError("throttled")
        return "done"

    retryable = lambda e: isinstance(e, ConnectionError)  # noqa: E731
    assert await retry(flaky, retryable=retryable, timeout=10, backoff=FAST) == "done"
    assert len(attempts) == 3


async def test_retry_raises_what_is_not_retryable_at_once_and_the_rest_at_the_deadline() -> None:
    calls = 0

    async def refused() -> None:
        nonlocal calls
        calls += 1
        raise PermissionError("no")

    with pytest.raises(PermissionError):
        await retry(refused, retryable=lambda e: False, timeout=10, backoff=FAST)
    assert calls == 1
    began = time.monotonic()
    with pytest.raises(PermissionError):
        await retry(refused, retryable=lambda e: True, timeout=0.2, backoff=FAST)
    assert 0.2 <= time.monotonic() - began < 5 and calls > 2
