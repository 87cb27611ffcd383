"""What dask-rawvm raises: one base, :class:`RawVMError`, for every error of its own.

``except RawVMError`` catches whatever dask-rawvm refused or could not do: an option
(:class:`OptionError`), a cloud's answer (:class:`ProviderError`, with the cloud's
error code in ``.code``), an instance-type request (:class:`CatalogError`), the cost
guard (:class:`~dask_rawvm.cost.BudgetExceeded`), an environment that cannot be built
for the VMs (:class:`~dask_rawvm.environment.EnvironmentTranslationError`), workers
that did not connect in time (:class:`WorkerBootTimeoutError`). Errors that
were ``ValueError`` or ``RuntimeError`` before this base existed still are (a second
base), so code catching those keeps working. Every message names the cause and the fix.
"""

from __future__ import annotations

from typing import Any

from distributed.exceptions import WorkerStartTimeoutError


class RawVMError(Exception):
    """Base of every error dask-rawvm raises on purpose."""


class OptionError(RawVMError, ValueError):
    """An option that is not one, or a value outside its choices."""


class UnknownOptionError(RawVMError, TypeError):
    """A keyword that is not an option (a TypeError, as Python's own for a bad keyword)."""


class CatalogError(RawVMError, ValueError):
    """An instance-type request that cannot be met; the message names the cause and the fix."""


class ProviderError(RawVMError, RuntimeError):
    """The cloud refused or failed a request; the message names the call and the cause.

    Parameters
    ----------
    message
        What failed, why, and the fix.
    code
        The cloud's own error code when it gave one (``"InsufficientInstanceCapacity"``,
        ``"InvalidGroup.NotFound"``), for callers that decide by it; None otherwise.
    """

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


class WorkerBootTimeoutError(RawVMError, WorkerStartTimeoutError):
    """Workers did not connect in time: distributed's :class:`WorkerStartTimeoutError`
    (what ``Client.wait_for_workers`` raises), saying what each missing VM was doing.

    Parameters
    ----------
    available_workers, expected_workers, timeout
        As for :class:`distributed.exceptions.WorkerStartTimeoutError`.
    waiting
        What the workers not connected were doing: each VM's state and the last
        line of its boot log, and which workers had no capacity yet.
    fix
        What to do about it.
    """

    def __init__(
        self,
        available_workers: int,
        expected_workers: int,
        timeout: float,
        waiting: str = "",
        fix: str = "",
    ) -> None:
        super().__init__(available_workers, expected_workers, timeout)
        self.waiting = waiting
        self.fix = fix

    def __str__(self) -> str:
        parts = [
            f"only {self.available_workers} of {self.expected_workers} workers connected "
            f"within {self.timeout:g} s",
            self.waiting,
            self.fix,
        ]
        return "; ".join(p for p in parts if p)

    def __reduce__(self) -> tuple[Any, ...]:
        # OSError (a base) keeps two of three arguments in .args: rebuild from the fields.
        return (
            type(self),
            (
                self.available_workers,
                self.expected_workers,
                self.timeout,
                self.waiting,
                self.fix,
            ),
        )
