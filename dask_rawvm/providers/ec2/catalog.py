"""Instance types: what a region offers, what it costs, and which ones fit a worker's needs.

Users name machines (``worker_vm_types=["m6i.large"]``) or describe what a worker needs
(``worker_cpu=2, worker_memory="16 GiB", worker_gpu="A10G", arm=True``). This module turns
either into a list of :class:`VMType`, cheapest first, and refuses impossible requests
with a :class:`CatalogError` that names the cause and the fix, before anything launches.

The data comes from ``DescribeInstanceTypes`` (cached in memory and on disk for a day:
a full describe takes seconds) and from a price table shipped with the package
(``dask_rawvm/providers/ec2/data/prices.json``), optionally refined by live spot prices.
"""

from __future__ import annotations

import asyncio
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from botocore.exceptions import BotoCoreError, ClientError
from dask.utils import format_bytes

from dask_rawvm.errors import CatalogError, ProviderError
from dask_rawvm.needs import MARKETS, MiB, Needs, check_market
from dask_rawvm.providers.ec2.calls import error_code

logger = logging.getLogger(__name__)

#: Architectures a Dask worker can run on; mac instances need dedicated hosts.
ARCHITECTURES = ("x86_64", "arm64")
#: Environment variable naming the cache directory (default ``~/.cache/dask-rawvm``).
CACHE_ENV = "DASK_RAWVM_CACHE_DIR"
#: How long a cached DescribeInstanceTypes answer is trusted, in seconds.
CACHE_TTL = 24 * 3600.0
_CACHE_VERSION = 1
#: Previous-generation types rank as if this much dearer: their cores are slower.
PREVIOUS_GENERATION_PENALTY = 1.2
#: A live spot price below this fraction of on-demand is not believed (moto answers $0.00001).
MIN_PLAUSIBLE_SPOT_FRACTION = 0.02
_ACCELERATOR_KEYS = ("FpgaInfo", "NeuronInfo", "InferenceAcceleratorInfo", "MediaAcceleratorInfo")
#: Estimated prices rank as if this much dearer: a listed price is a safer bet.
ESTIMATE_PENALTY = 1.15
_BURSTABLE = re.compile(r"^t\d")
_GiB_IN_MiB = 1024


# -- instance types ------------------------------------------------------------------------


@dataclass(frozen=True)
class VMType:
    """One instance type, as a region offers it.

    Prices are USD per hour and None until a :class:`PriceTable` fills them in
    (:meth:`PriceTable.annotate`).
    """

    name: str
    vcpus: int
    memory_mib: int
    arch: str
    gpus: int = 0
    gpu_model: str | None = None
    gpu_memory_mib: int = 0
    on_demand_price: float | None = None
    spot_price: float | None = None
    #: The on-demand price is estimated from vCPUs/memory/GPUs, not listed.
    price_estimated: bool = False
    #: The spot price is a live DescribeSpotPriceHistory price, not the default discount.
    spot_price_live: bool = False
    burstable: bool = False
    current_generation: bool = True
    #: Has GPUs or other accelerators (FPGA, Inferentia/Trainium, media).
    accelerated: bool = False
    usage_classes: tuple[str, ...] = MARKETS
    bare_metal: bool = False

    @property
    def family(self) -> str:
        """``m6i`` for ``m6i.large``."""
        return self.name.split(".", 1)[0]

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / _GiB_IN_MiB

    def supports(self, market: str) -> bool:
        """Whether the type can be bought on ``market`` ("on-demand" or "spot")."""
        return market in self.usage_classes

    def price(self, market: str) -> float | None:
        """Hourly price on ``market``, when known."""
        check_market(market)
        return self.spot_price if market == "spot" else self.on_demand_price

    def describe(self) -> str:
        """``m6i.large (2 vCPU, 8 GiB, x86_64)``, with GPUs when it has some."""
        parts = [f"{self.vcpus} vCPU", f"{self.memory_gib:g} GiB", self.arch]
        if self.gpus:
            parts.append(f"{self.gpus} x {self.gpu_model} GPU")
        return f"{self.name} ({', '.join(parts)})"


def parse_instance_types(
    describe_instance_types_pages: Iterable[Mapping[str, Any]],
) -> dict[str, VMType]:
    """Instance types from raw ``DescribeInstanceTypes`` responses.

    Parameters
    ----------
    describe_instance_types_pages
        Response dicts as botocore returns them, each with an ``InstanceTypes`` list.

    Returns
    -------
    dict
        :class:`VMType` by name, without prices.
    """
    types: dict[str, VMType] = {}
    for page in describe_instance_types_pages:
        for info in page.get("InstanceTypes", []):
            if info.get("SupportedInRegion", True):
                vm = _parse_instance_type(info)
                types[vm.name] = vm
    return types


def _parse_instance_type(info: Mapping[str, Any]) -> VMType:
    archs = info.get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    gpu_info = info.get("GpuInfo") or {}
    gpus = gpu_info.get("Gpus", [])
    gpu_count = sum(int(g.get("Count", 0)) for g in gpus)
    gpu_memory = gpu_info.get("TotalGpuMemoryInMiB") or sum(
        int(g.get("Count", 0)) * int(g.get("MemoryInfo", {}).get("SizeInMiB", 0)) for g in gpus
    )
    models = sorted({g["Name"] for g in gpus if g.get("Name")})
    name = info["InstanceType"]
    return VMType(
        name=name,
        vcpus=int(info["VCpuInfo"]["DefaultVCpus"]),
        memory_mib=int(info["MemoryInfo"]["SizeInMiB"]),
        # ("i386", "x86_64") is x86_64; Graviton lists only arm64; macs are arm64_mac/x86_64_mac.
        arch="arm64" if "arm64" in archs else "x86_64" if "x86_64" in archs else archs[0],
        gpus=gpu_count,
        gpu_model="/".join(models) or None,
        gpu_memory_mib=int(gpu_memory),
        # t8i and friends do not all set the flag in every data set; the t family is burstable.
        burstable=bool(info.get("BurstablePerformanceSupported")) or bool(_BURSTABLE.match(name)),
        current_generation=bool(info.get("CurrentGeneration", True)),
        accelerated=bool(gpus) or any(info.get(k) for k in _ACCELERATOR_KEYS),
        usage_classes=tuple(info.get("SupportedUsageClasses", MARKETS)),
        bare_metal=bool(info.get("BareMetal", False)),
    )


# -- fetching, with a cache ------------------------------------------------------------------

_memory_cache: dict[tuple[str, str], tuple[float, dict[str, VMType]]] = {}


def cache_dir() -> Path:
    """Where cached cloud answers live: ``$DASK_RAWVM_CACHE_DIR`` or ``~/.cache/dask-rawvm``."""
    explicit = os.environ.get(CACHE_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "dask-rawvm"


def clear_memory_cache() -> None:
    """Forget the in-memory instance types (the disk cache stays)."""
    _memory_cache.clear()


def _cache_key(endpoint_url: str, region: str) -> tuple[str, str]:
    # Every local cloud serves the same moto data whatever its port: key loopback
    # endpoints without the port, so quick starts and test runs share one file.
    parts = urlsplit(endpoint_url)
    if parts.hostname in ("127.0.0.1", "localhost", "::1"):
        endpoint_url = f"{parts.scheme}://{parts.hostname}"
    return endpoint_url, region


def _cache_path(directory: Path, key: tuple[str, str]) -> Path:
    digest = hashlib.sha256("\n".join(key).encode()).hexdigest()[:12]
    return directory / f"instance-types-{key[1]}-{digest}.json"


def _read_disk_cache(path: Path, key: tuple[str, str], ttl: float) -> dict[str, VMType] | None:
    try:
        data = json.loads(path.read_text())
        fresh = time.time() - float(data["fetched_at"]) < ttl
        if data["version"] != _CACHE_VERSION or tuple(data["key"]) != key or not fresh:
            return None
        return {d["name"]: _vm_from_json(d) for d in data["types"]}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as e:
        logger.info("ignoring unreadable instance-type cache %s: %s", path, e)
        return None


def _write_disk_cache(path: Path, key: tuple[str, str], types: Mapping[str, VMType]) -> None:
    data = {
        "version": _CACHE_VERSION,
        "key": list(key),
        "fetched_at": time.time(),
        "types": [dataclasses.asdict(vm) for vm in types.values()],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write then rename: a concurrent reader sees the old file or the new one, never half.
        with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
            json.dump(data, f)
        os.replace(f.name, path)
    except OSError as e:  # a read-only home must not stop a cluster
        logger.warning("could not cache instance types in %s: %s", path, e)


def _vm_from_json(data: dict[str, Any]) -> VMType:
    data = {**data, "usage_classes": tuple(data.get("usage_classes", MARKETS))}
    return VMType(**data)


async def fetch_instance_types(
    ec2_client: Any,
    *,
    cache_directory: str | Path | None = None,
    ttl: float = CACHE_TTL,
    refresh: bool = False,
) -> dict[str, VMType]:
    """Every instance type the client's region offers, cached in memory and on disk.

    A full ``DescribeInstanceTypes`` takes seconds (measured 2.2-2.4 s for the local
    cloud's 1395 types, which moto returns in one page; AWS pages 100 at a time), so
    the answer is kept in memory and in a JSON file per (endpoint, region) for ``ttl``
    seconds: a second cluster start makes no call. Only the types the region offers
    (``DescribeInstanceTypeOfferings``, one more call) are kept: moto describes every
    type in every region.

    Parameters
    ----------
    ec2_client
        An aiobotocore EC2 client.
    cache_directory
        Directory for the cache file; :func:`cache_dir` when None.
    ttl
        Seconds a cached answer is used for.
    refresh
        Ignore the caches and ask the cloud.

    Raises
    ------
    ProviderError
        When the cloud refuses the call.
    """
    key = _cache_key(str(ec2_client.meta.endpoint_url), str(ec2_client.meta.region_name))
    path = _cache_path(Path(cache_directory) if cache_directory else cache_dir(), key)
    if not refresh:
        cached = _memory_cache.get(key)
        if cached is not None and time.time() - cached[0] < ttl:
            return dict(cached[1])
        from_disk = _read_disk_cache(path, key, ttl)
        if from_disk is not None:
            _memory_cache[key] = (time.time(), from_disk)
            return dict(from_disk)
    types = await _describe_instance_types(ec2_client)
    _memory_cache[key] = (time.time(), types)
    _write_disk_cache(path, key, types)
    return dict(types)


async def _describe_instance_types(ec2_client: Any) -> dict[str, VMType]:
    start = time.perf_counter()
    pages, offered = await asyncio.gather(
        _all_pages(ec2_client, "describe_instance_types", PaginationConfig={"PageSize": 100}),
        _offered_types(ec2_client),
    )
    types = parse_instance_types(pages)
    if offered is not None:
        types = {name: vm for name, vm in types.items() if name in offered}
    logger.info(
        "described %d instance types in %d page(s), %.1f s",
        len(types),
        len(pages),
        time.perf_counter() - start,
    )
    return types


async def _offered_types(ec2_client: Any) -> set[str] | None:
    """Names the region offers, or None when the cloud will not say.

    AWS answers DescribeInstanceTypes for the region already, but moto answers it with
    every type it knows; the offerings are what tell which ones a region has.
    """
    try:
        pages = await _all_pages(
            ec2_client, "describe_instance_type_offerings", LocationType="region"
        )
    except ProviderError as e:
        logger.info("no instance type offerings (%s); using every described type", e)
        return None
    return {o["InstanceType"] for page in pages for o in page.get("InstanceTypeOfferings", [])}


async def _all_pages(ec2_client: Any, operation: str, **params: Any) -> list[dict[str, Any]]:
    paginator = ec2_client.get_paginator(operation)
    try:
        return [page async for page in paginator.paginate(**params)]
    except (ClientError, BotoCoreError) as e:
        raise ProviderError(f"EC2 {_action(operation)} failed: {e}", error_code(e)) from e


def _action(operation: str) -> str:
    return "".join(word.capitalize() for word in operation.split("_"))


# -- prices --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PriceTable:
    """Hourly prices for one region: the packaged table, estimates, and live spot prices.

    Build one with :meth:`load`; refine spot prices with :meth:`with_live_spot`.
    """

    region: str
    multiplier: float
    per_vcpu: Mapping[str, float]
    listed: Mapping[str, float]
    spot_discount: float
    estimate: Mapping[str, Any]
    as_of: str
    #: Live spot prices, by (type, zone).
    live_spot: Mapping[tuple[str, str], float] = field(default_factory=dict)

    @classmethod
    def load(cls, region: str = "us-east-1", path: str | Path | None = None) -> PriceTable:
        """The packaged price table (or the JSON file at ``path``), scaled to ``region``."""
        if path is None:
            text = (
                resources.files("dask_rawvm.providers.ec2").joinpath("data/prices.json").read_text()
            )
        else:
            text = Path(path).read_text()
        data = json.loads(text)
        multiplier = data["region_multipliers"].get(region)
        if multiplier is None:
            logger.info(
                "no price multiplier for region %s; assuming %s",
                region,
                data["default_region_multiplier"],
            )
            multiplier = data["default_region_multiplier"]
        return cls(
            region=region,
            multiplier=float(multiplier),
            per_vcpu=data["per_vcpu"],
            listed=data["types"],
            spot_discount=float(data["default_spot_discount"]),
            estimate=data["estimate"],
            as_of=str(data["as_of"]),
        )

    def with_live_spot(self, live: Mapping[tuple[str, str], float]) -> PriceTable:
        """A copy that prices spot from ``live`` (see :func:`live_spot_prices`) where it can."""
        return dataclasses.replace(self, live_spot={**self.live_spot, **live})

    def on_demand(self, vm: VMType) -> tuple[float, bool]:
        """``(price, estimated)``: the on-demand USD/hour of ``vm`` in this region."""
        if vm.name in self.listed:
            return self.listed[vm.name] * self.multiplier, False
        if vm.family in self.per_vcpu:
            return self.per_vcpu[vm.family] * vm.vcpus * self.multiplier, False
        return self._estimate(vm) * self.multiplier, True

    def _estimate(self, vm: VMType) -> float:
        est = self.estimate
        base = est["per_vcpu"] * vm.vcpus + est["per_gib"] * vm.memory_gib
        if vm.arch == "arm64":  # Graviton lists ~20% below the x86 type of the same shape
            base *= est["arm_factor"]
        per_gpu = est["per_gpu"].get(vm.gpu_model or "", est["per_gpu_unknown"])
        return float(base + per_gpu * vm.gpus)

    def spot(self, vm: VMType, zones: Iterable[str] | None = None) -> tuple[float, bool]:
        """``(price, live)``: the cheapest believable live spot price, else the default discount.

        A live price below ``MIN_PLAUSIBLE_SPOT_FRACTION`` of on-demand is ignored (moto
        reports $0.00001 for everything); one above on-demand is capped at it, which is
        the default maximum a spot request pays.
        """
        on_demand, _ = self.on_demand(vm)
        wanted = set(zones) if zones is not None else None
        live = [
            p
            for (name, zone), p in self.live_spot.items()
            if name == vm.name
            and (wanted is None or zone in wanted)
            and p >= MIN_PLAUSIBLE_SPOT_FRACTION * on_demand
        ]
        if live:
            return min(min(live), on_demand), True
        return on_demand * (1 - self.spot_discount), False

    def price(self, vm: VMType, market: str) -> float:
        """USD/hour of ``vm`` on ``market``."""
        check_market(market)
        return self.spot(vm)[0] if market == "spot" else self.on_demand(vm)[0]

    def annotate(self, vm: VMType) -> VMType:
        """``vm`` with its prices filled in."""
        on_demand, estimated = self.on_demand(vm)
        spot, live = self.spot(vm)
        return dataclasses.replace(
            vm,
            on_demand_price=on_demand,
            spot_price=spot,
            price_estimated=estimated,
            spot_price_live=live,
        )

    def annotate_all(self, types: Mapping[str, VMType]) -> dict[str, VMType]:
        """Every type with its prices filled in."""
        return {name: self.annotate(vm) for name, vm in types.items()}


@dataclass(frozen=True)
class StoragePrices:
    """What a region bills besides instance hours, per machine: gp3 storage and public IPv4.

    From the packaged table (``data/ebs_prices.json``): list prices, an estimate.
    """

    region: str
    gp3_gb_month: float
    public_ipv4_hourly: float
    hours_per_month: float = 730.0

    @classmethod
    def load(cls, region: str = "us-east-1") -> StoragePrices:
        text = (
            resources.files("dask_rawvm.providers.ec2").joinpath("data/ebs_prices.json").read_text()
        )
        data = json.loads(text)
        return cls(
            region=region,
            gp3_gb_month=float(data["gp3_gb_month"].get(region, data["default_gp3_gb_month"])),
            public_ipv4_hourly=float(data["public_ipv4_hourly"]),
            hours_per_month=float(data["hours_per_month"]),
        )

    def volume_hourly(self, size_gib: int) -> float:
        """USD per hour of a gp3 volume of ``size_gib`` (billed by the GB-month, prorated)."""
        return self.gp3_gb_month * size_gib / self.hours_per_month


async def live_spot_prices(
    ec2_client: Any, types: Iterable[str], zones: Iterable[str] | None = None
) -> dict[tuple[str, str], float]:
    """Current Linux spot prices by ``(type, zone)``, from ``DescribeSpotPriceHistory``.

    Parameters
    ----------
    ec2_client
        An aiobotocore EC2 client.
    types
        Instance type names.
    zones
        Availability zones to ask about; all of the region's when None.

    Notes
    -----
    The local cloud (moto 5.2.5) answers $0.00001 for every type and zone, dated
    2006; :meth:`PriceTable.spot` ignores prices that low.
    """
    names = sorted(set(types))
    if not names:
        return {}
    params: dict[str, Any] = {
        "ProductDescriptions": ["Linux/UNIX", "Linux/UNIX (Amazon VPC)"],
        # A start time of now asks for the price in force now, one row per type and zone.
        "StartTime": datetime.now(timezone.utc),
    }
    if zones is not None:
        params["Filters"] = [{"Name": "availability-zone", "Values": sorted(set(zones))}]
    latest: dict[tuple[str, str], tuple[datetime, float]] = {}
    paginator = ec2_client.get_paginator("describe_spot_price_history")
    try:
        for start in range(0, len(names), 100):
            chunk = names[start : start + 100]
            async for page in paginator.paginate(InstanceTypes=chunk, **params):
                for row in page.get("SpotPriceHistory", []):
                    key = (row["InstanceType"], row["AvailabilityZone"])
                    stamp = row["Timestamp"]
                    if key not in latest or stamp > latest[key][0]:
                        latest[key] = (stamp, float(row["SpotPrice"]))
    except (ClientError, BotoCoreError) as e:
        raise ProviderError(f"EC2 DescribeSpotPriceHistory failed: {e}", error_code(e)) from e
    return {key: price for key, (_, price) in latest.items()}


def _gpu_key(model: str) -> str:
    # "a10g" == "A10G"; "rtx-pro-4500" == "RTX PRO 4500".
    return "".join(c for c in model.lower() if c.isalnum())


# -- ranking -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Need:
    """One need as a predicate, with how to say it and how to relax it."""

    label: str
    test: Callable[[VMType], bool]
    #: Orders near misses: the types that come closest to meeting this need first.
    closeness: Callable[[VMType], float]
    fix: str
    #: The user option that asked for it.
    option: str


def _needs_list(needs: Needs) -> list[_Need]:
    result = []
    if needs.cpu:
        cpu = needs.cpu
        result.append(
            _Need(
                f">= {cpu} vCPU",
                lambda t: t.vcpus >= cpu,
                lambda t: -t.vcpus,
                "ask for fewer vCPUs per worker (a smaller worker_cpu) and use more workers",
                f"worker_cpu={cpu}",
            )
        )
    if needs.memory_mib:
        mem = needs.memory_mib
        result.append(
            _Need(
                f">= {format_bytes(mem * MiB)} memory",
                lambda t: t.memory_mib >= mem,
                lambda t: -t.memory_mib,
                "ask for less memory per worker (a smaller worker_memory) and use more workers",
                "worker_memory",
            )
        )
    if needs.gpus:
        gpus = needs.gpus
        result.append(
            _Need(
                f">= {gpus} GPU",
                lambda t: t.gpus >= gpus,
                lambda t: -t.gpus,
                "ask for fewer GPUs per worker (worker_gpu) and use more workers",
                "worker_gpu",
            )
        )
    if needs.gpu_model:
        key = _gpu_key(needs.gpu_model)
        result.append(
            _Need(
                f"GPU model {needs.gpu_model}",
                lambda t: t.gpu_model is not None and _gpu_key(t.gpu_model) == key,
                lambda t: abs(t.gpus - needs.gpus),
                "choose another GPU model (worker_gpu=...)",
                "worker_gpu",
            )
        )
    if needs.arch:
        arch = needs.arch
        result.append(
            _Need(
                arch,
                lambda t: t.arch == arch,
                lambda t: 0.0,
                "set arm=None to accept either architecture",
                f"arm={needs.arm}",
            )
        )
    if needs.market == "spot":
        result.append(
            _Need(
                "spot support",
                lambda t: t.supports("spot"),
                lambda t: 0.0,
                "use on-demand for these workers",
                "spot_policy",
            )
        )
    return result


def _pool(types: Mapping[str, VMType], needs: Needs) -> list[VMType]:
    """The types worth considering at all for a need-based choice."""
    return [
        t
        for t in types.values()
        if t.arch in ARCHITECTURES
        # (Spot support is a need of its own, so that its absence can be explained.)
        and (needs.market == "spot" or t.supports("on-demand"))
        and (needs.allow_burstable or not t.burstable)
        # Without a GPU need, accelerated types only waste money on idle accelerators.
        and (t.gpus > 0 if needs.gpus else not t.accelerated)
    ]


def _within_oversize(candidates: list[VMType], needs: Needs) -> list[VMType]:
    """Drop types far bigger than asked; never below the smallest type that fits."""
    limits: list[tuple[Callable[[VMType], int], int]] = []
    for asked, size in (
        (needs.cpu, lambda t: t.vcpus),
        (needs.memory_mib, lambda t: t.memory_mib),
        (needs.gpus or None, lambda t: t.gpus),
    ):
        if asked:
            smallest = min(size(t) for t in candidates)
            limits.append((size, max(math.floor(asked * needs.max_oversize), smallest)))
    return [t for t in candidates if all(size(t) <= cap for size, cap in limits)]


def _rank_key(vm: VMType, market: str) -> tuple[float, bool, bool, int, int, str]:
    price = vm.price(market)
    assert price is not None  # annotated before ranking
    if not vm.current_generation:
        price *= PREVIOUS_GENERATION_PENALTY
    if vm.price_estimated:
        price *= ESTIMATE_PENALTY
    return (price, not vm.current_generation, vm.price_estimated, vm.vcpus, vm.memory_mib, vm.name)


def rank_candidates(
    types: Mapping[str, VMType],
    needs: Needs,
    prices: PriceTable,
    limit: int | None = 10,
) -> list[VMType]:
    """The types that meet ``needs``, cheapest first on the market asked for.

    Burstable types (t2/t3/t4g) and types with accelerators nobody asked for are left
    out; so are types more than ``needs.max_oversize`` times the vCPUs, memory or GPUs
    asked (unless nothing smaller fits), so "2 CPUs" never picks a 96-vCPU box that is
    cheap per core. Previous-generation types rank as if ``PREVIOUS_GENERATION_PENALTY``
    times dearer, and types whose price is estimated (not in the price table) as if
    ``ESTIMATE_PENALTY`` times dearer: a listed price is the safer bet.

    Parameters
    ----------
    types
        The region's types (:func:`fetch_instance_types`).
    needs
        What a worker needs, and the market (:class:`Needs`).
    prices
        The region's prices; the returned types carry them.
    limit
        At most this many types; all when None.

    Raises
    ------
    CatalogError
        When no type meets the needs: the message names the binding need, the
        nearest types and the fix.
    """
    pool = _pool(types, needs)
    _check_gpu_model(pool, needs, prices.region)
    tests = _needs_list(needs)
    meeting = [t for t in pool if all(n.test(t) for n in tests)]
    if not meeting:
        raise CatalogError(_explain_no_match(pool, tests, needs, prices))
    annotated = [prices.annotate(t) for t in _within_oversize(meeting, needs)]
    annotated.sort(key=lambda t: _rank_key(t, needs.market))
    return annotated if limit is None else annotated[:limit]


def _check_gpu_model(pool: list[VMType], needs: Needs, region: str) -> None:
    if not needs.gpu_model:
        return
    models = sorted({t.gpu_model for t in pool if t.gpu_model})
    if _gpu_key(needs.gpu_model) not in {_gpu_key(m) for m in models}:
        raise CatalogError(
            f"no instance type with GPU {needs.gpu_model!r} in {region}; GPUs available here: "
            f"{', '.join(models) or 'none'}. Fix: pass one of those as worker_gpu, or use a "
            f"region that offers {needs.gpu_model}"
        )


def _explain_no_match(
    pool: list[VMType], tests: list[_Need], needs: Needs, prices: PriceTable
) -> str:
    """Which need rules everything out, the nearest types, and what to change."""
    head = f"no instance type in {prices.region} meets the worker needs ({needs.describe()})"
    alone = [n for n in tests if not any(n.test(t) for t in pool)]
    if alone:  # a need no type meets even on its own
        need = alone[0]
        return (
            f"{head}: none has {need.label}; nearest: {_nearest(pool, need, needs, prices)}. "
            f"Fix: {need.fix}"
        )
    # Otherwise the needs rule each other out: relaxing any one that lets a type
    # through is a way out; say which, with what it would give.
    binding = [
        n for n in tests if any(all(m.test(t) for m in tests if m is not n) for t in pool)
    ] or tests
    ways = []
    for need in binding:
        others = [t for t in pool if _meets_others(t, tests, need)]
        ways.append(f"without {need.label}: {_nearest(others, need, needs, prices)}")
    labels = " and ".join(n.label for n in binding)
    fixes = "; or ".join(n.fix for n in binding)
    return f"{head}: {labels} rule each other out. Nearest {'; '.join(ways)}. Fix: {fixes}"


def _meets_others(vm: VMType, tests: list[_Need], skip: _Need) -> bool:
    return all(m.test(vm) for m in tests if m is not skip)


def _nearest(candidates: list[VMType], need: _Need, needs: Needs, prices: PriceTable) -> str:
    """The three types that come closest to ``need``, cheapest among equals."""
    near = sorted(candidates, key=lambda t: (need.closeness(t), prices.price(t, needs.market)))
    return ", ".join(t.describe() for t in near[:3]) or "none"


# -- explicit names ------------------------------------------------------------------------


def resolve_vm_types(
    types: Mapping[str, VMType],
    names: Iterable[str],
    prices: PriceTable,
    needs: Needs | None = None,
) -> list[VMType]:
    """Types the user named, checked against the region and any needs also given.

    Parameters
    ----------
    types
        The region's types.
    names
        Instance type names, e.g. ``["m6i.large", "m7i.large"]``; burstable ones are fine.
    prices
        The region's prices; the returned types carry them.
    needs
        Needs given alongside (``arm=``, ``worker_gpu=``, ...); each named type must meet them.

    Raises
    ------
    CatalogError
        For an unknown name (with close names), a type of the wrong architecture, one
        that misses a need, or one not sold on the market asked for.
    """
    chosen = []
    for raw in names:
        name = raw.strip().lower()
        if name not in types:
            raise CatalogError(_unknown_type_message(raw, types, prices.region))
        vm = types[name]
        if vm.arch not in ARCHITECTURES:
            raise CatalogError(
                f"{name} is a {vm.arch} instance (macOS, dedicated hosts only), which cannot "
                "run Dask workers here. Fix: choose a Linux type such as m7i.large or m7g.large"
            )
        if needs is not None:
            _check_named_meets(vm, needs, types)
        chosen.append(prices.annotate(vm))
    if not chosen:
        raise CatalogError("no instance type given: pass at least one name, e.g. ['m6i.large']")
    return chosen


def _unknown_type_message(name: str, types: Mapping[str, VMType], region: str) -> str:
    close = difflib.get_close_matches(name.strip().lower(), list(types), n=4, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return (
        f"unknown instance type {name!r} in {region}.{hint} Fix: use a type this region "
        "offers (`aws ec2 describe-instance-types`), or give worker_cpu/worker_memory and "
        "let dask-rawvm choose"
    )


def _check_named_meets(vm: VMType, needs: Needs, types: Mapping[str, VMType]) -> None:
    if needs.arch and vm.arch != needs.arch:
        raise CatalogError(
            f"{vm.name} is {vm.arch} but arm={needs.arm} asks for {needs.arch}. Fix: drop "
            f"arm={needs.arm}, or choose an {needs.arch} type such as "
            f"{_same_shape(vm, needs.arch, types)}"
        )
    for need in _needs_list(dataclasses.replace(needs, arm=None)):
        if not need.test(vm):
            raise CatalogError(
                f"{vm.describe()} does not have {need.label}, which {need.option} asks for. "
                f"Fix: name a type that has {need.label}, or drop {need.option}, or drop "
                "worker_vm_types to let dask-rawvm choose"
            )


def _same_shape(vm: VMType, arch: str, types: Mapping[str, VMType]) -> str:
    """A few types of ``arch`` with ``vm``'s vCPUs and memory, newest families first."""
    same = [
        t.name
        for t in types.values()
        if t.arch == arch
        and t.vcpus == vm.vcpus
        and t.memory_mib == vm.memory_mib
        # Plain families (m7g, m7i, m8a): no local disk, network or flex variants.
        and t.current_generation
        and re.fullmatch(r"[a-z]\d+[agi]", t.family)
    ]
    same.sort(key=lambda n: (-_generation(n), n))
    return " or ".join(same[:3]) or f"any {arch} type"


def _generation(name: str) -> int:
    digits = "".join(c for c in name.split(".")[0] if c.isdigit())
    return int(digits or 0)


def choose_vm_types(
    types: Mapping[str, VMType],
    prices: PriceTable,
    names: Iterable[str] | None = None,
    needs: Needs | None = None,
    limit: int | None = 5,
) -> list[VMType]:
    """The named types (checked) when names are given, else the cheapest that meet ``needs``.

    This is the one call a cluster makes, for its workers and for its scheduler.
    """
    if names:
        return resolve_vm_types(types, names, prices, needs)
    return rank_candidates(types, needs or Needs(), prices, limit=limit)
