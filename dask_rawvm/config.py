"""Options: read once, in one place, dask-jobqueue style.

Precedence, highest first: an explicit keyword argument; the chosen section of
dask's config (``rawvm.<config_name>``, which a user may add as a profile); the
packaged section of the profile's provider (``rawvm.local`` / ``rawvm.aws``).
dask's own config machinery supplies user YAML files and ``DASK_RAWVM__...``
environment variables on top of the packaged ``rawvm.yaml``.
"""

from __future__ import annotations

import dataclasses
import math
import os
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import dask.config
import yaml
from dask.utils import parse_timedelta

from dask_rawvm.errors import OptionError, UnknownOptionError
from dask_rawvm.needs import SpotPolicy, check_spot_policy

_DEFAULTS = os.path.join(os.path.dirname(__file__), "rawvm.yaml")
with open(_DEFAULTS) as f:
    PACKAGED: dict[str, Any] = yaml.safe_load(f)
dask.config.update_defaults(PACKAGED)

#: The providers: each has a packaged section of its own name, whose ``provider`` is that
#: name (a profile names one of them). :data:`dask_rawvm.providers.PROVIDERS` has a class
#: for each.
PROVIDERS = tuple(
    name
    for name, section in PACKAGED["rawvm"].items()
    if isinstance(section, dict) and section.get("provider") == name
)
SCHEDULER_PLACEMENTS = ("vm", "local")
#: ``environment_check=``: a start whose VMs differ from this environment in a package this
#: process imported fails ("error"), or only says so ("warn"), or is not checked ("off").
ENVIRONMENT_CHECKS = ("error", "warn", "off")
#: ``local_image=``: the local cloud's machine images (see dask_rawvm.localcloud.vmimage).
LOCAL_IMAGES = ("warm", "bare")
#: ``credentials=``: what AWS identity the VMs get (see dask_rawvm.data and docs/data.rst):
#: "forward" this client's as short-lived credentials over the cluster's TLS connection,
#: "role" an IAM instance profile (one named, or the cluster's own scoped to ``data=``); None
#: nothing.
CREDENTIALS_MODES = ("forward", "role", None)
#: ``zone="auto"``: EC2 picks one zone with capacity and the whole cluster stays in it.
ZONE_AUTO = "auto"
#: ``zone="any"``: every zone of the subnets, the cluster spread over them.
ZONE_ANY = "any"


@dataclass(frozen=True)
class ClusterOptions:
    """Every option a RawVMCluster runs with, resolved and validated."""

    provider: str
    name: str | None = None
    region: str | None = None
    endpoint_url: str | None = None
    boot_delay: float = 0.0
    local_image: str = "warm"
    scheduler: str = "vm"
    scheduler_vm_type: str = "t3.medium"
    worker_vm_type: str = "t3.large"
    worker_vm_types: list[str] | None = None
    spot_policy: SpotPolicy = "on-demand"
    zone: str | list[str] = ZONE_AUTO
    vpc: str | None = None
    subnets: list[str] | None = None
    security_groups: list[str] | None = None
    public_ip: bool = True
    worker_disk_size: int = 40
    scheduler_disk_size: int = 20
    capacity_retry_timeout: float = 600.0
    ami: str | None = None
    worker_nthreads: int | None = None
    worker_memory_limit: str = "auto"
    death_timeout: float = 60.0
    idle_timeout: float | None = 1200.0
    scheduler_timeout: float = 300.0
    wait_for_workers: bool | int | float = True
    worker_start_timeout: float = 300.0
    launch_window: float = 0.005
    tags: dict[str, str] = field(default_factory=dict)
    environment: Any = "local"
    environment_ignore: list[str] = field(default_factory=list)
    environment_resolver: str = "uv"
    environment_check: str = "error"
    local_code: bool = True
    hosts: list[str] = field(default_factory=list)
    workers_per_host: int = 1
    connect_options: dict[str, Any] = field(default_factory=dict)
    progress: bool | None = None
    max_workers: int | None = None
    worker_cpu: int | None = None
    worker_memory: str | None = None
    worker_gpu: Any = None
    arm: bool | None = None
    max_hourly_cost: float | None = None
    log_rate_warning: float | None = 100.0
    allow_ingress_from: list[str] | None = None
    tls: bool = True
    credentials: str | None = "forward"
    iam_instance_profile: str | None = None
    data: list[str] = field(default_factory=list)
    files: list[str] = field(default_factory=list)


OPTION_NAMES = [f.name for f in dataclasses.fields(ClusterOptions)]
#: Options for which None is a choice, not "not given" (``credentials=None``: nothing).
NONE_IS_A_CHOICE = frozenset({"credentials"})


class _NotGiven:
    """The default of a keyword whose None is a choice: the option was not given."""

    def __repr__(self) -> str:
        return "<not given>"


NOT_GIVEN: Any = _NotGiven()
_DURATIONS = (
    "boot_delay",
    "death_timeout",
    "idle_timeout",
    "scheduler_timeout",
    "worker_start_timeout",
    "launch_window",
    "capacity_retry_timeout",
)


def resolve_options(config_name: str | None = None, **kwargs: Any) -> ClusterOptions:
    """Merge keyword arguments over a config section into :class:`ClusterOptions`.

    Parameters
    ----------
    config_name
        Section of ``rawvm`` in dask's config to read (``"local"``, ``"aws"``, or
        a profile of the user's). ``rawvm.config-name`` when None, except that an
        explicit ``endpoint_url`` or ``provider="aws"`` selects ``"aws"``.
    **kwargs
        Options; a value of None means "not given".

    Raises
    ------
    UnknownOptionError
        For a keyword that is not an option (a TypeError too).
    OptionError
        For an unknown section, a key in a section that is not an option, or a
        value outside its choices (a ValueError too).
    """
    unknown = set(kwargs) - set(OPTION_NAMES)
    if unknown:
        raise UnknownOptionError(
            f"unknown option(s) {sorted(unknown)}; valid options are {OPTION_NAMES}"
        )
    given = {
        k: v
        for k, v in kwargs.items()
        if v is not NOT_GIVEN and (v is not None or k in NONE_IS_A_CHOICE)
    }
    if config_name is None:
        config_name = _default_section(given)
    merged = _section(config_name)
    merged.update(given)
    if merged.get("zone") is None:  # a section's "zone: null" (the old default) means the default
        merged.pop("zone", None)
    if merged.get("credentials") in ("none", "None"):  # from an environment variable
        merged["credentials"] = None
    for key in set(_DURATIONS) & set(merged):
        merged[key] = _seconds(key, merged[key])
    options = ClusterOptions(**merged)
    _validate(options, config_name)
    return options


def _default_section(given: dict[str, Any]) -> str:
    if given.get("provider") in PROVIDERS:
        return str(given["provider"])
    if "endpoint_url" in given:
        return "aws"
    return str(dask.config.get("rawvm.config-name", default="local"))


def _section(config_name: str) -> dict[str, Any]:
    """A section as options, over its provider's packaged section (so profiles stay short)."""
    raw = dask.config.get(f"rawvm.{config_name}", default=None)
    if not isinstance(raw, dict):
        sections = sorted(k for k, v in dask.config.get("rawvm").items() if isinstance(v, dict))
        raise OptionError(
            f"no configuration section 'rawvm.{config_name}'; known sections: {sections}. "
            "Pass config_name= one of those, or add the section to your dask config."
        )
    section = {k.replace("-", "_"): v for k, v in raw.items()}
    provider = section.get("provider", config_name)
    if provider != config_name and provider in PROVIDERS:
        base = _section(provider)
        base.update(section)
        section = base
    unknown = set(section) - set(OPTION_NAMES)
    if unknown:
        raise OptionError(
            f"configuration section 'rawvm.{config_name}' has unknown key(s) "
            f"{sorted(k.replace('_', '-') for k in unknown)}; valid keys are "
            f"{[k.replace('_', '-') for k in OPTION_NAMES]}"
        )
    return section


def _seconds(key: str, value: Any) -> float | None:
    if value is None or value in ("none", "None", False):
        if key == "idle_timeout":
            return None
        raise OptionError(f"option {key} needs a duration, got {value!r}")
    return float(parse_timedelta(value, default="seconds"))


def _validate(options: ClusterOptions, config_name: str) -> None:
    if options.provider not in PROVIDERS:
        raise OptionError(
            f"provider={options.provider!r} (section 'rawvm.{config_name}') is not one of "
            f"{list(PROVIDERS)}"
        )
    if options.scheduler not in SCHEDULER_PLACEMENTS:
        raise OptionError(
            f"scheduler={options.scheduler!r} is not one of {list(SCHEDULER_PLACEMENTS)}: "
            "'vm' runs the scheduler on its own VM, 'local' in this process"
        )
    check_spot_policy(options.spot_policy)
    check_wait_for_workers(options.wait_for_workers)
    rate = options.log_rate_warning
    if rate is not None and (
        isinstance(rate, bool) or not isinstance(rate, int | float) or rate <= 0
    ):
        raise OptionError(
            f"log_rate_warning={rate!r} must be a number of records per second above 0, "
            "or None never to warn"
        )
    if options.worker_vm_types is not None and (
        isinstance(options.worker_vm_types, str) or not options.worker_vm_types
    ):
        raise OptionError(
            f"worker_vm_types={options.worker_vm_types!r} must be a non-empty list of "
            "instance types, best first (worker_vm_type takes a single one)"
        )
    if options.local_image not in LOCAL_IMAGES:
        raise OptionError(
            f"local_image={options.local_image!r} is not one of {list(LOCAL_IMAGES)}: 'warm' "
            "boots VMs that share this machine's Python, uv and caches (fast), 'bare' VMs "
            "like a fresh Amazon Linux 2023 one (no uv, no pip, nothing cached)"
        )
    if options.environment_check not in ENVIRONMENT_CHECKS:
        raise OptionError(
            f"environment_check={options.environment_check!r} is not one of "
            f"{list(ENVIRONMENT_CHECKS)}: 'error' stops a start whose VMs differ from this "
            "environment in a package this process imported, 'warn' only says so, 'off' skips it"
        )
    _check_network(options)
    _check_data(options)
    if options.environment_resolver not in ("uv", "pip-tools"):
        raise OptionError(
            f"environment_resolver={options.environment_resolver!r} is not 'uv' or 'pip-tools' "
            "(pip-tools only resolves for this machine's platform)"
        )
    if options.provider == "local" and options.endpoint_url:
        raise OptionError(
            "provider='local' starts its own cloud and takes no endpoint_url; "
            "to use a local cloud running elsewhere pass provider='aws', endpoint_url=..."
        )


def _check_network(options: ClusterOptions) -> None:
    """Shapes only (a zone, a list of them; ids that look like EC2's); what exists is the
    provider's to check, before it launches anything."""
    zone = options.zone
    if not isinstance(zone, (str, list)) or not zone:
        raise OptionError(
            f"zone={zone!r}: pass 'auto' (one zone EC2 picks, the default), 'any' (every zone), "
            "a zone ('us-east-1a') or a list of zones"
        )
    for key, prefix in (("subnets", "subnet-"), ("security_groups", "sg-")):
        value = getattr(options, key)
        if value is None:
            continue
        if (
            isinstance(value, str)
            or not value
            or not all(isinstance(v, str) and v.startswith(prefix) for v in value)
        ):
            raise OptionError(
                f"{key}={value!r} must be a non-empty list of ids ({prefix}...), e.g. "
                f'{key}=["{prefix}0123456789abcdef0"]'
            )
    if options.vpc is not None and not str(options.vpc).startswith("vpc-"):
        raise OptionError(f"vpc={options.vpc!r} is not a VPC id (vpc-...)")
    for key in ("worker_disk_size", "scheduler_disk_size"):
        size = getattr(options, key)
        # gp3 volumes take 1 to 16384 GiB; below 8 no Amazon Linux 2023 image fits.
        if isinstance(size, bool) or not isinstance(size, int) or not 8 <= size <= 16384:
            raise OptionError(
                f"{key}={size!r} must be a whole number of GiB from 8 (the size of an Amazon "
                "Linux 2023 image) to 16384 (gp3's largest), e.g. 100"
            )


def _check_data(options: ClusterOptions) -> None:
    """``credentials=`` one of its modes; ``data=`` S3 URLs; ``files=`` a list of paths."""
    if options.credentials not in CREDENTIALS_MODES:
        raise OptionError(
            f"credentials={options.credentials!r} is not one of {list(CREDENTIALS_MODES)}: "
            "'forward' gives the VMs this client's AWS identity as short-lived credentials, "
            "'role' an IAM instance profile scoped to data=, None nothing"
        )
    if options.credentials == "role" and not options.iam_instance_profile and not options.data:
        raise OptionError(
            "credentials='role' gives every VM an IAM role: name what the cluster's own role "
            "may read and write with data=['s3://bucket/prefix', ...], or pass "
            "iam_instance_profile='<name or ARN>' (a profile of your own), or use "
            "credentials='forward' (the default: your identity, short-lived, refreshed while "
            "you are connected)"
        )
    if options.iam_instance_profile and options.credentials != "role":
        raise OptionError(
            f"iam_instance_profile={options.iam_instance_profile!r} is the identity of "
            f"credentials='role', and credentials={options.credentials!r}: pass "
            "credentials='role' with it, or drop it"
        )
    if options.provider == "ssh" and options.credentials is not None:
        raise OptionError(
            f"credentials={options.credentials!r} needs EC2 (provider='aws' or 'local'): SSH "
            "hosts keep the AWS identity they have; pass credentials=None"
        )
    data = options.data
    if isinstance(data, str) or not all(isinstance(u, str) and u.startswith("s3://") for u in data):
        raise OptionError(
            f"data={data!r} must be a list of S3 URLs the cluster reads and writes, e.g. "
            'data=["s3://my-bucket/prefix"]'
        )
    if isinstance(options.files, str) or not all(isinstance(p, str) for p in options.files):
        raise OptionError(
            f"files={options.files!r} must be a list of local paths (files or directories), "
            'e.g. files=["data/lookup.csv", "config/"]'
        )


def split_s3_url(url: str) -> tuple[str, str]:
    """A ``data=`` URL, ``s3://bucket/prefix``, as ``("bucket", "prefix")`` (``""``: the whole
    bucket)."""
    parts = urllib.parse.urlsplit(url)
    return parts.netloc, parts.path.strip("/")


def check_wait_for_workers(value: object) -> None:
    """``wait_for_workers`` is True, False, a count of workers, or a fraction of them."""
    ok = (
        isinstance(value, bool)
        or (isinstance(value, int) and value >= 0)
        or (isinstance(value, float) and 0.0 <= value <= 1.0)
    )
    if not ok:
        raise OptionError(
            f"wait_for_workers={value!r} is not True (every worker launched), False (none), "
            "a count of workers (3) or a fraction of them (0.9)"
        )


def workers_to_wait_for(value: bool | int | float, n_workers: int) -> int:
    """How many of ``n_workers`` a start waits for, as ``wait_for_workers`` says."""
    if isinstance(value, bool):
        return n_workers if value else 0
    if isinstance(value, float):
        return math.ceil(value * n_workers)
    if value > n_workers:
        raise OptionError(
            f"wait_for_workers={value} is more than n_workers={n_workers}: wait for at most "
            "n_workers, or pass True to wait for all of them"
        )
    return value
