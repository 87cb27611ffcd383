"""What a worker needs, and where its machines are bought: one vocabulary for every cloud.

Markets and spot policies are named here once, as ``Literal`` types: the options
(:mod:`dask_rawvm.config`) validate a policy with :func:`check_spot_policy`, clouds
launch on the markets :func:`markets_of` gives, catalogs and cost meters price by
:data:`Market`. :class:`Needs` turns ``worker_cpu``/``worker_memory``/``worker_gpu``/``arm``
into a request any provider with a catalog of machine types can answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, cast, get_args

from dask.utils import format_bytes, parse_bytes

from dask_rawvm.errors import CatalogError, OptionError

#: How a machine is bought: at list price, or from spare capacity the cloud may take back.
Market = Literal["on-demand", "spot"]
#: Which markets a cluster's workers are bought on (the scheduler's always on-demand).
SpotPolicy = Literal["on-demand", "spot", "spot_with_fallback"]
MARKETS: tuple[Market, ...] = get_args(Market)
SPOT_POLICIES: tuple[SpotPolicy, ...] = get_args(SpotPolicy)
#: The markets of each policy, in the order a launch asks them: ``spot_with_fallback``
#: takes the spot capacity there is and fills the rest on-demand.
_POLICY_MARKETS: dict[str, tuple[Market, ...]] = {
    "on-demand": ("on-demand",),
    "spot": ("spot",),
    "spot_with_fallback": ("spot", "on-demand"),
}
#: A machine may have at most this many times the vCPUs/memory/GPUs asked for.
MAX_OVERSIZE = 4.0
MiB = 2**20


def check_market(market: str) -> Market:
    """``market`` as a :data:`Market`; a :class:`~dask_rawvm.errors.CatalogError` if it is none."""
    if market not in MARKETS:
        raise CatalogError(f"market {market!r} is not one of {', '.join(MARKETS)}")
    return cast(Market, market)


def check_spot_policy(policy: str) -> SpotPolicy:
    """``policy`` as a :data:`SpotPolicy`; an :class:`~dask_rawvm.errors.OptionError` naming
    the choices if it is none."""
    if policy not in SPOT_POLICIES:
        raise OptionError(
            f"spot_policy={policy!r} is not one of {list(SPOT_POLICIES)}: "
            "'spot_with_fallback' takes the spot capacity there is and fills the rest on-demand"
        )
    return cast(SpotPolicy, policy)


def markets_of(policy: str) -> tuple[Market, ...]:
    """The markets ``policy`` buys on, in the order to ask them; none for an unknown policy.

    Options are checked once, where they are read (:func:`check_spot_policy`); a launch
    that is handed something else finds no market to buy on, and says so.
    """
    return _POLICY_MARKETS.get(policy, ())


@dataclass(frozen=True)
class Needs:
    """What one worker needs; None/0 means "anything".

    Build one from user options with :meth:`from_options`.
    """

    cpu: int | None = None
    memory_mib: int | None = None
    gpus: int = 0
    gpu_model: str | None = None
    #: True: arm64 (Graviton); False: x86_64; None: either.
    arm: bool | None = None
    market: Market = "on-demand"
    max_oversize: float = MAX_OVERSIZE
    allow_burstable: bool = False

    def __post_init__(self) -> None:
        check_market(self.market)
        if self.cpu is not None and self.cpu < 1:
            raise CatalogError(f"worker_cpu={self.cpu}: a worker needs at least 1 vCPU")
        if self.memory_mib is not None and self.memory_mib < 1:
            raise CatalogError("worker_memory must be positive, e.g. worker_memory='16 GiB'")
        if self.gpus < 0:
            raise CatalogError(f"worker_gpu={self.gpus}: a GPU count cannot be negative")
        if self.max_oversize < 1:
            raise CatalogError(f"max_oversize={self.max_oversize} must be at least 1")
        if self.gpu_model and not self.gpus:  # naming a model asks for one
            object.__setattr__(self, "gpus", 1)

    @classmethod
    def from_options(
        cls,
        worker_cpu: int | None = None,
        worker_memory: str | int | None = None,
        worker_gpu: int | str | tuple[int, str] | None = None,
        arm: bool | None = None,
        market: Market = "on-demand",
    ) -> Needs:
        """Needs from the user's options.

        Parameters
        ----------
        worker_cpu
            Minimum vCPUs.
        worker_memory
            Minimum memory: a string with a unit ("16 GiB", "8GB") or a number of bytes.
        worker_gpu
            A GPU count (``1``), a model (``"A10G"``, meaning one) or both (``(2, "A100")``).
        arm
            True for arm64 (Graviton), False for x86_64, None for either.
        market
            "on-demand" or "spot": which price ranks the candidates.
        """
        gpus, model = parse_gpu(worker_gpu)
        return cls(
            cpu=None if worker_cpu is None else int(worker_cpu),
            memory_mib=parse_memory(worker_memory),
            gpus=gpus,
            gpu_model=model,
            arm=arm,
            market=market,
        )

    @property
    def arch(self) -> str | None:
        return None if self.arm is None else "arm64" if self.arm else "x86_64"

    def describe(self) -> str:
        """``>= 2 vCPU, >= 16 GiB, 1 x A10G GPU, arm64, spot``."""
        parts = []
        if self.cpu:
            parts.append(f">= {self.cpu} vCPU")
        if self.memory_mib:
            parts.append(f">= {format_bytes(self.memory_mib * MiB)}")
        if self.gpus:
            parts.append(f"{self.gpus} x {self.gpu_model or 'any'} GPU")
        if self.arch:
            parts.append(self.arch)
        parts.append(self.market)
        return ", ".join(parts)


def parse_memory(value: str | int | None) -> int | None:
    """MiB from "16 GiB", "8GB" or a number of bytes (dask's convention); None stays None."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            size = parse_bytes(value)
        except ValueError as e:
            raise CatalogError(
                f"worker_memory={value!r} is not a size: pass e.g. worker_memory='16 GiB'"
            ) from e
    else:
        size = int(value)
        if 0 < size < MiB:  # "16" meant GiB, surely, but guessing units hides mistakes
            raise CatalogError(
                f"worker_memory={value!r} is read as bytes, which is too small for a VM: "
                f"pass a unit, e.g. worker_memory='{value} GiB'"
            )
    return math.ceil(size / MiB)


def parse_gpu(value: int | str | tuple[int, str] | None) -> tuple[int, str | None]:
    """``(count, model)`` from ``1``, ``"A10G"`` or ``(2, "A100")``."""
    if value is None or value is False:
        return 0, None
    if isinstance(value, bool):  # True: one GPU of any model
        return 1, None
    if isinstance(value, int):
        return value, None
    if isinstance(value, str):
        return 1, value.strip()
    if isinstance(value, (tuple, list)) and len(value) == 2:
        count, model = value
        if isinstance(count, int) and isinstance(model, str):
            return count, model.strip()
    raise CatalogError(
        f"worker_gpu={value!r} is not understood: pass a count (worker_gpu=1), a model "
        "(worker_gpu='A10G') or both (worker_gpu=(2, 'A100'))"
    )
