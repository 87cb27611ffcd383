"""Launching N machines through EC2 Fleet (``CreateFleet``, type ``instant``), with failover.

One request asks for many instances across every candidate type x subnet ("capacity pool"),
so a scale-up of N machines costs ``ceil(N / 1000)`` CreateFleet calls plus at most one
launch-template call in the happy path. When capacity runs out we fail over ourselves:

- an error the fleet reports for one pool (``Errors`` in the response) drops that pool for the
  rest of the pass, whatever the error (InsufficientInstanceCapacity, Unsupported, an error
  this module has never heard of...): another pool may launch;
- an error of a whole market (a spot or on-demand quota, the spot service-linked role missing)
  drops every pool of that market; with ``spot_policy="spot_with_fallback"`` the spot
  shortfall is then asked for on-demand at once;
- otherwise the shortfall is asked for again from the pools left, and once none are left we back
  off and look at every pool again until ``capacity_retry_timeout`` (unless every pool failed
  for a reason waiting cannot fix);
- throttling and 5xx answers are retried with full-jitter backoff and the same ClientToken;
  a template just made that the fleet does not see yet (eventual consistency) too;
- an error of the whole call that no failover can fix (bad parameter, permissions), or a
  market error with no market left, is one :class:`FleetLaunchError` at once, naming the
  cause and the fix; what earlier calls of the pass launched stays launched and is the
  caller's (it is in the error's ``result``).

Launch calls must go through a client with botocore retries off: ICE is an HTTP 500, which
botocore would retry blindly (measured: a default client sends CreateFleet again after an
injected ICE). The pure parts (:func:`fleet_request`, :func:`parse_fleet_response`,
:class:`FailoverPlanner`) are separate so they can be tested with responses shaped like AWS's,
which moto cannot produce.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from dask_rawvm.backoff import Backoff, retry
from dask_rawvm.errors import ProviderError
from dask_rawvm.needs import Market, SpotPolicy, markets_of
from dask_rawvm.providers.base import CLUSTER_TAG
from dask_rawvm.providers.ec2.calls import (
    SETTLE_TIMEOUT,
    THROTTLE_BACKOFF,
    THROTTLING,
    TRANSIENT,
    ec2_call,
    error_code,
    error_message,
    not_found,
    paginate,
)
from dask_rawvm.providers.ec2.catalog import VMType

logger = logging.getLogger(__name__)

#: Instances per CreateFleet call. Assumption: 1000 per instant fleet, the figure the project's
#: provisioning issue gives; AWS documents a 10,000 target capacity per fleet, so 1000 is safe,
#: and it matches the ~1000-instance launch token bucket.
MAX_PER_FLEET = 1000
#: Overrides per request. AWS caps request/maintain fleets at 300 across all launch templates and
#: documents no cap for instant fleets; we keep the 300 best-ranked pools as a sane bound.
MAX_OVERRIDES = 300
#: User-data limit, before base64 encoding.
MAX_USER_DATA = 16 * 1024

#: Another type, zone or market may have what this pool lacks.
CAPACITY = {
    "InsufficientInstanceCapacity",
    "InsufficientCapacity",
    "UnfulfillableCapacity",
    "Unsupported",
    "SpotMaxPriceTooLow",
    "InsufficientFreeAddressesInSubnet",
}
#: Errors of a whole market (a quota, the spot service-linked role): no pool of that market
#: can launch, the other market may.
MARKET_WIDE = {
    "MaxSpotInstanceCountExceeded",
    "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
    "VcpuLimitExceeded",
    "InstanceLimitExceeded",
}
#: Kept for callers of the earlier name.
MARKET_QUOTA = MARKET_WIDE
#: Worth asking again later: capacity comes back, throttling passes.
TRY_LATER = CAPACITY | THROTTLING | TRANSIENT

_FIXES = {
    "VcpuLimitExceeded": "the account's On-Demand vCPU quota is used up. Fix: ask for a higher "
    "'Running On-Demand Standard instances' quota in Service Quotas, or for fewer/smaller workers",
    "InstanceLimitExceeded": "the account's instance quota is used up. Fix: ask for a higher "
    "quota in Service Quotas, or for fewer workers",
    "MaxSpotInstanceCountExceeded": "the account's spot vCPU quota is used up. Fix: use "
    "spot_policy='spot_with_fallback', or ask for a higher 'All Standard Spot Instance Requests' "
    "quota in Service Quotas",
    "AuthFailure.ServiceLinkedRoleCreationNotPermitted": "the account has no spot service-linked "
    "role and these credentials may not create it. Fix: create it once (`aws iam "
    "create-service-linked-role --aws-service-name spot.amazonaws.com`), allow "
    "iam:CreateServiceLinkedRole (see `dask-rawvm iam-policy`), or use "
    "spot_policy='spot_with_fallback' or 'on-demand'",
    "UnauthorizedOperation": "these credentials may not launch instances. Fix: allow "
    "ec2:CreateFleet, ec2:RunInstances, ec2:CreateTags and the launch-template actions "
    "(and iam:PassRole if the template names an instance profile)",
    "AuthFailure": "AWS does not accept these credentials. Fix: check AWS_PROFILE or the keys",
    "InvalidParameterValue": "a launch parameter is wrong (see the message). Fix: check the "
    "instance types, the AMI of each architecture and the subnets",
    "RequestLimitExceeded": "EC2 kept throttling past throttle_timeout. Fix: launch fewer "
    "machines at once, or allow a longer throttle_timeout",
    "InvalidParameterCombination": "launch parameters conflict (see the message). Fix: check "
    "the instance types, the AMI of each architecture and the subnets",
}

#: A launch template deleted meanwhile (by id, or by name).
_TEMPLATE_GONE = {"InvalidLaunchTemplateId.NotFound", "InvalidLaunchTemplateName.NotFoundException"}

Candidate = VMType | tuple[str, str]
OnLaunch = Callable[[list["LaunchedInstance"]], object]


class FleetLaunchError(ProviderError):
    """A launch stopped on an error no failover can fix.

    ``result`` holds what was launched before it: the caller owns those instances.
    """

    def __init__(self, message: str, result: FleetResult, code: str | None = None) -> None:
        super().__init__(message, code)
        self.result = result


# -- what goes in, what comes out ------------------------------------------------------------


@dataclass(frozen=True)
class Pool:
    """One capacity pool: an instance type in one subnet (so one zone)."""

    vm_type: str
    arch: str
    subnet_id: str
    zone: str
    rank: int
    markets: tuple[str, ...] = ("on-demand", "spot")


@dataclass(frozen=True)
class LaunchedInstance:
    """One instance a fleet launched."""

    id: str
    vm_type: str
    zone: str | None
    subnet_id: str | None
    market: str


@dataclass(frozen=True)
class PoolError:
    """A launch error for one pool, or for every pool of a market (``vm_type`` etc. None)."""

    market: str
    code: str
    message: str = ""
    vm_type: str | None = None
    subnet_id: str | None = None
    zone: str | None = None
    #: An error of the whole CreateFleet call, not one the fleet reported for a pool.
    whole_call: bool = False

    def matches(self, pool: Pool) -> bool:
        return (
            (self.vm_type is None or self.vm_type == pool.vm_type)
            and (self.subnet_id is None or self.subnet_id == pool.subnet_id)
            and (self.zone is None or self.zone == pool.zone)
        )

    def where(self) -> str:
        """``spot m6i.large in us-east-1a``."""
        what = self.vm_type or "any type"
        zone = self.zone or self.subnet_id
        return f"{self.market} {what}" + (f" in {zone}" if zone else "")


@dataclass
class FleetResult:
    """What a launch got, what it still lacks, and how it failed over."""

    requested: int
    instances: list[LaunchedInstance] = field(default_factory=list)
    failovers: list[str] = field(default_factory=list)
    #: CreateFleet calls made, retries included.
    calls: int = 0

    @property
    def missing(self) -> int:
        return max(self.requested - len(self.instances), 0)

    @property
    def ids(self) -> list[str]:
        return [i.id for i in self.instances]

    def count(self, market: str) -> int:
        return sum(i.market == market for i in self.instances)

    def summary(self) -> str:
        """One human line: ``launched 25 of 25 (15 spot, 10 on-demand) ...; failovers: ...``."""
        markets = ", ".join(f"{self.count(m)} {m}" for m in ("spot", "on-demand") if self.count(m))
        text = f"launched {len(self.instances)} of {self.requested}"
        text += f" ({markets})" if markets else ""
        text += f" in {self.calls} CreateFleet call{'s' * (self.calls != 1)}"
        if self.missing:
            text += f"; {self.missing} still missing"
        if self.failovers:
            text += "; failovers: " + "; ".join(self.failovers)
        return text


#: Between passes once every pool ran out: capacity frees up over minutes.
CAPACITY_BACKOFF = Backoff(5.0, 60.0)


# -- the launch template ---------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchTemplate:
    """A cluster's launch template and the version the next launch uses."""

    id: str
    name: str
    version: str
    #: Digest of the version's data: an identical launch reuses the version, no call.
    digest: str = ""

    def specification(self) -> dict[str, str]:
        return {"LaunchTemplateId": self.id, "Version": self.version}


def template_name(cluster: str) -> str:
    """A valid, unique launch-template name for a cluster (names allow ``[\\w().-/]``)."""
    stem = re.sub(r"[^A-Za-z0-9().\-/_]", "-", cluster)[:80]
    return f"dask-rawvm-{stem}-{hashlib.sha1(cluster.encode()).hexdigest()[:8]}"


@dataclass(frozen=True)
class RootVolume:
    """The root volume a launch gives its machines: the image's root device, so many GiB of
    gp3 (3000 IOPS and 125 MB/s included in gp3's price), deleted with the machine."""

    device: str
    size_gib: int

    def mapping(self) -> dict[str, Any]:
        return {
            "DeviceName": self.device,
            "Ebs": {"VolumeSize": self.size_gib, "VolumeType": "gp3", "DeleteOnTermination": True},
        }


def template_data(
    cluster: str,
    *,
    user_data: str,
    tags: dict[str, str] | None = None,
    security_group_ids: Sequence[str] = (),
    public_ip: bool = True,
    root_volume: RootVolume | None = None,
    standard_credits: bool = False,
    instance_profile: str | None = None,
) -> dict[str, Any]:
    """``LaunchTemplateData`` for a cluster's machines.

    No AMI and no instance type: each fleet override names both, so one template serves
    every type and architecture. ``InstanceMetadataTags`` stays off: nothing reads tags
    from the metadata service, and with it on EC2 refuses tag keys with spaces or ``/``.
    ``standard_credits`` launches T-family types with standard CPU credits: T3 and T4g
    default to unlimited, which bills surplus credits past the hourly price.
    """
    raw = user_data.encode()
    if len(raw) > MAX_USER_DATA:
        raise ProviderError(
            f"user-data is {len(raw)} bytes; EC2 takes at most {MAX_USER_DATA}. Fix: ship a short "
            "script that fetches the rest from a URL"
        )
    all_tags = [{"Key": k, "Value": v} for k, v in {**(tags or {}), CLUSTER_TAG: cluster}.items()]
    data: dict[str, Any] = {
        "InstanceInitiatedShutdownBehavior": "terminate",
        "MetadataOptions": {
            "HttpTokens": "required",
            "HttpEndpoint": "enabled",
            "InstanceMetadataTags": "disabled",
        },
        # Tagged at creation: no CreateTags call, and no untagged instance if we crash.
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": all_tags},
            {"ResourceType": "volume", "Tags": all_tags},
        ],
        # Launch templates take user-data base64-encoded (botocore encodes it only for
        # RunInstances).
        "UserData": base64.b64encode(raw).decode(),
    }
    if root_volume is not None:
        data["BlockDeviceMappings"] = [root_volume.mapping()]
    if standard_credits:
        data["CreditSpecification"] = {"CpuCredits": "standard"}
    if instance_profile:
        key = "Arn" if instance_profile.startswith("arn:") else "Name"
        data["IamInstanceProfile"] = {key: instance_profile}
    if security_group_ids:
        data["NetworkInterfaces"] = [
            {
                "DeviceIndex": 0,
                "AssociatePublicIpAddress": public_ip,
                "Groups": list(security_group_ids),
                "DeleteOnTermination": True,
            }
        ]
    return data


async def ensure_launch_template(
    ec2: Any,
    cluster: str,
    *,
    user_data: str,
    tags: dict[str, str] | None = None,
    security_group_ids: Sequence[str] = (),
    public_ip: bool = True,
    root_volume: RootVolume | None = None,
    standard_credits: bool = False,
    instance_profile: str | None = None,
    template: LaunchTemplate | None = None,
) -> LaunchTemplate:
    """The cluster's launch template, with a version carrying this launch's user-data and tags.

    Parameters
    ----------
    ec2
        An aiobotocore EC2 client.
    cluster
        Cluster name; the template is tagged with it (:data:`CLUSTER_TAG`).
    user_data
        The boot script (plain text; encoded here).
    tags
        Tags for instances and volumes, besides the cluster tag.
    security_group_ids
        Security groups of the primary network interface, which then gets a public IP
        when ``public_ip``; the VPC's default group when empty.
    public_ip
        Whether instances get a public address (only with ``security_group_ids``).
    root_volume
        The root volume's device and size; the image's own when None.
    standard_credits
        Launch burstable (T-family) types with standard CPU credits; only for launches
        whose candidates are all burstable (EC2 takes the option for T types only).
    instance_profile
        The IAM instance profile (name or ARN) of every machine; none when None.
    template
        What the previous call returned, if any.

    Returns
    -------
    LaunchTemplate
        The first call creates the template (1 call); later calls create a new version
        (1 call), or none when user-data and tags are unchanged.

    Notes
    -----
    Every version carries the full data rather than ``SourceVersion`` plus user-data: moto
    does not merge a source version (measured), and the data is small.
    """
    data = template_data(
        cluster,
        user_data=user_data,
        tags=tags,
        security_group_ids=security_group_ids,
        public_ip=public_ip,
        root_volume=root_volume,
        standard_credits=standard_credits,
        instance_profile=instance_profile,
    )
    digest = hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()
    if template is not None and template.digest == digest:
        return template
    if template is not None:
        return await _new_version(ec2, template.id, template.name, data, digest)
    name = template_name(cluster)
    try:
        response = await ec2_call(
            ec2.create_launch_template,
            "CreateLaunchTemplate",
            LaunchTemplateName=name,
            LaunchTemplateData=data,
            TagSpecifications=[
                {
                    "ResourceType": "launch-template",
                    "Tags": [{"Key": CLUSTER_TAG, "Value": cluster}],
                }
            ],
            ClientToken=uuid.uuid4().hex,
        )
    except ProviderError as e:
        # Left by an earlier run of a cluster of this name, or made concurrently: reuse it.
        if e.code != "InvalidLaunchTemplateName.AlreadyExistsException":
            raise
        found = await ec2_call(
            ec2.describe_launch_templates, "DescribeLaunchTemplates", LaunchTemplateNames=[name]
        )
        return await _new_version(
            ec2, found["LaunchTemplates"][0]["LaunchTemplateId"], name, data, digest
        )
    created = response["LaunchTemplate"]
    return LaunchTemplate(
        created["LaunchTemplateId"], name, str(created["LatestVersionNumber"]), digest
    )


async def _new_version(
    ec2: Any, template_id: str, name: str, data: dict[str, Any], digest: str
) -> LaunchTemplate:
    response = await ec2_call(
        ec2.create_launch_template_version,
        "CreateLaunchTemplateVersion",
        settle=SETTLE_TIMEOUT,  # a template just made may be unknown for a moment
        LaunchTemplateId=template_id,
        LaunchTemplateData=data,
        ClientToken=uuid.uuid4().hex,
    )
    version = str(response["LaunchTemplateVersion"]["VersionNumber"])
    return LaunchTemplate(template_id, name, version, digest)


async def delete_launch_templates(ec2: Any, cluster: str) -> list[str]:
    """Delete every launch template tagged with ``cluster`` (all versions); return their ids."""
    filters = [{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
    templates = await paginate(
        ec2.describe_launch_templates, "DescribeLaunchTemplates", "LaunchTemplates", Filters=filters
    )
    ids = [t["LaunchTemplateId"] for t in templates]
    deleted = []
    for template_id in ids:
        try:
            await ec2_call(
                ec2.delete_launch_template, "DeleteLaunchTemplate", LaunchTemplateId=template_id
            )
        except ProviderError as e:
            if e.code not in _TEMPLATE_GONE:  # gone already is what we wanted
                raise
            continue
        deleted.append(template_id)
    return deleted


# -- building requests and reading answers (pure) --------------------------------------------


def make_pools(candidates: Iterable[Candidate], subnets: Iterable[tuple[str, str]]) -> list[Pool]:
    """Every candidate type x subnet, best-ranked type first (rank = position in candidates)."""
    subnets = list(subnets)
    pools = []
    for rank, candidate in enumerate(candidates):
        if isinstance(candidate, VMType):
            name, arch, markets = candidate.name, candidate.arch, candidate.usage_classes
        else:
            (name, arch), markets = candidate, ("on-demand", "spot")
        pools += [Pool(name, arch, s, z, rank, tuple(markets)) for s, z in subnets]
    return pools


def fleet_request(
    template: LaunchTemplate,
    pools: Sequence[Pool],
    market: str,
    count: int,
    ami_by_arch: dict[str, str],
    client_token: str,
    cluster: str | None = None,
    single_zone: bool = False,
) -> dict[str, Any]:
    """CreateFleet parameters: one launch-template config per architecture, one override per pool.

    The AMI goes in each override (allowed for instant fleets), so one template serves
    x86_64 and arm64. Priority is the type's rank: on-demand ``prioritized`` follows it;
    spot ``price-capacity-optimized`` weighs price and spare capacity itself. With
    ``single_zone``, EC2 launches the whole request in one zone of its choosing
    (``SingleAvailabilityZone``, for either market).
    """
    by_arch: dict[str, list[dict[str, Any]]] = {}
    for pool in sorted(pools, key=lambda p: p.rank)[:MAX_OVERRIDES]:
        by_arch.setdefault(pool.arch, []).append(
            {
                "InstanceType": pool.vm_type,
                "SubnetId": pool.subnet_id,
                "ImageId": ami_by_arch[pool.arch],
                "Priority": float(pool.rank),
            }
        )
    request: dict[str, Any] = {
        "Type": "instant",
        "ClientToken": client_token,
        "LaunchTemplateConfigs": [
            {"LaunchTemplateSpecification": template.specification(), "Overrides": overrides}
            for overrides in by_arch.values()
        ],
        "TargetCapacitySpecification": {
            "TotalTargetCapacity": count,
            "DefaultTargetCapacityType": market,
        },
        "SpotOptions": {"AllocationStrategy": "price-capacity-optimized"},
        "OnDemandOptions": {"AllocationStrategy": "prioritized"},
    }
    if single_zone:
        request["SpotOptions"]["SingleAvailabilityZone"] = True
        request["OnDemandOptions"]["SingleAvailabilityZone"] = True
    if cluster is not None:
        request["TagSpecifications"] = [
            {"ResourceType": "fleet", "Tags": [{"Key": CLUSTER_TAG, "Value": cluster}]}
        ]
    return request


def parse_fleet_response(
    response: dict[str, Any], pools: Sequence[Pool], market: str
) -> tuple[list[LaunchedInstance], list[PoolError]]:
    """The instances an instant fleet launched and the per-pool errors it reported."""
    zones = {p.subnet_id: p.zone for p in pools}
    instances = []
    for item in response.get("Instances") or []:
        override = item.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
        subnet = override.get("SubnetId")
        zone = override.get("AvailabilityZone") or zones.get(subnet)
        vm_type = item.get("InstanceType") or override.get("InstanceType", "")
        lifecycle = item.get("Lifecycle") or market
        instances += [
            LaunchedInstance(i, vm_type, zone, subnet, lifecycle)
            for i in item.get("InstanceIds", [])
        ]
    errors = []
    for item in response.get("Errors") or []:
        override = item.get("LaunchTemplateAndOverrides", {}).get("Overrides", {})
        subnet = override.get("SubnetId")
        errors.append(
            PoolError(
                market=item.get("Lifecycle") or market,
                code=item.get("ErrorCode", ""),
                message=item.get("ErrorMessage", ""),
                vm_type=override.get("InstanceType"),
                subnet_id=subnet,
                zone=override.get("AvailabilityZone") or zones.get(subnet),
            )
        )
    return instances, errors


_TYPE_TOKEN = re.compile(r"[a-z][a-z0-9-]*\.[a-z0-9-]*[a-z0-9]")
_ZONE_TOKEN = re.compile(r"\b[a-z]{2}(?:-[a-z]+)+-\d[a-z]\b")


def whole_call_error(code: str, message: str, market: str, pools: Sequence[Pool]) -> PoolError:
    """A capacity error of a whole call, tied to the pool its message names when it names one.

    AWS names the type and the requested zone first ("We currently do not have sufficient
    m6i.large capacity in the Availability Zone you requested (us-east-1a). ... choosing
    us-east-1b, ..."), so the first known type and zone in the message are the ones that failed.
    """
    types = {p.vm_type for p in pools}
    zones = {p.zone for p in pools}
    vm_type = next((t for t in _TYPE_TOKEN.findall(message) if t in types), None)
    zone = next((z for z in _ZONE_TOKEN.findall(message) if z in zones), None)
    return PoolError(market, code, message, vm_type=vm_type, zone=zone, whole_call=True)


class FailoverPlanner:
    """Which market and pools the next request uses, given the errors seen so far in a pass.

    Each :meth:`record` either launches something or drops at least one pool, so a pass
    ends after at most (pools + markets) requests.
    """

    def __init__(self, pools: Sequence[Pool], spot_policy: SpotPolicy | str) -> None:
        self.pools = list(pools)
        self.policy = spot_policy
        self.markets: tuple[Market, ...] = markets_of(spot_policy)
        self.dropped: dict[str, set[Pool]] = {m: set() for m in self.markets}
        #: Pools were dropped this pass for a reason that may pass (capacity, throttling).
        self.worth_retrying = False
        #: Why pools were dropped this pass for good, one error per code.
        self.permanent: dict[str, PoolError] = {}

    def reset(self) -> None:
        """Look at every pool again (capacity comes back)."""
        for dropped in self.dropped.values():
            dropped.clear()
        self.worth_retrying = False
        self.permanent.clear()

    def keep_zone(self, zone: str) -> None:
        """Ask only the pools of ``zone`` from now on (the cluster keeps to one zone)."""
        for market in self.markets:
            self.dropped.setdefault(market, set()).update(p for p in self.pools if p.zone != zone)

    def available(self, market: str) -> list[Pool]:
        return [
            p for p in self.pools if market in p.markets and p not in self.dropped.get(market, ())
        ]

    def market(self) -> str | None:
        """The preferred market that still has pools, or None when the pass is over."""
        return next((m for m in self.markets if self.available(m)), None)

    def fatal(self, error: PoolError) -> bool:
        """Whether no failover can fix ``error``: an error of a whole market with no market
        after it to go to, or an error of the whole call that waiting cannot fix. An error
        the fleet reports for one pool drops that pool, whatever it is."""
        if error.code in MARKET_WIDE:
            return error.market == self.markets[-1]
        return error.whole_call and error.code not in TRY_LATER

    def record(self, market: str, errors: Sequence[PoolError], shortfall: int) -> list[str]:
        """Drop the pools that failed; return one human line per failover.

        A shortfall no error explains (moto never reports errors) drops the whole market
        for this pass: asking the same pools again at once would get the same answer.
        """
        failed = []
        before = len(self.available(market))
        for error in errors:
            if error.code in MARKET_WIDE:
                hit = self.available(error.market)
            else:
                hit = [p for p in self.available(error.market) if error.matches(p)]
            self.dropped.setdefault(error.market, set()).update(hit)
            if hit:
                failed.append(f"{error.where()}: {error.code}")
                if error.code in TRY_LATER:
                    self.worth_retrying = True
                else:
                    self.permanent.setdefault(error.code, error)
        if shortfall and len(self.available(market)) == before:
            self.dropped[market].update(self.available(market))
            failed.append(f"{market}: {shortfall} not launched")
            self.worth_retrying = True
        then = self._next(market, shortfall)
        return [f"{line} -> {then}" for line in failed]

    def _next(self, market: str, shortfall: int) -> str:
        """What the next request does about a failure."""
        if not shortfall:
            return "filled from other pools"
        if market == "spot" and self.policy == "spot_with_fallback":
            return "on-demand"
        return "other types/zones" if self.available(market) else "none left, retrying later"


# -- launching -------------------------------------------------------------------------------


async def launch_fleet(
    ec2: Any,
    *,
    template: LaunchTemplate,
    candidates: Sequence[Candidate],
    subnets: Sequence[tuple[str, str]],
    count: int,
    ami_by_arch: dict[str, str],
    spot_policy: str = "on-demand",
    capacity_retry_timeout: float = 0.0,
    throttle_timeout: float = 120.0,
    max_per_call: int = MAX_PER_FLEET,
    cluster: str | None = None,
    on_launch: OnLaunch | None = None,
    throttle_backoff: Backoff = THROTTLE_BACKOFF,
    capacity_backoff: Backoff = CAPACITY_BACKOFF,
    single_zone: bool = False,
) -> FleetResult:
    """Launch ``count`` instances through instant fleets, failing over across pools and markets.

    Parameters
    ----------
    ec2
        An aiobotocore EC2 client **with botocore retries off** (``total_max_attempts=1``).
    template
        From :func:`ensure_launch_template`.
    candidates
        Instance types, best first: :class:`~dask_rawvm.providers.ec2.catalog.VMType` (its
        usage classes are honoured) or ``(name, arch)``.
    subnets
        ``(subnet_id, zone)`` pairs to launch into.
    count
        Instances wanted.
    ami_by_arch
        AMI id for each architecture among the candidates (``x86_64``, ``arm64``).
    spot_policy
        ``"on-demand"``, ``"spot"``, or ``"spot_with_fallback"`` (spot first; the spot
        shortfall goes on-demand in the same pass).
    capacity_retry_timeout
        Seconds to keep trying once every pool has failed. 0 makes one pass: the caller gets
        what exists now and may ask for the rest in the background (:class:`FleetTopUp`).
    throttle_timeout
        Seconds to keep backing off one throttled or 5xx call.
    max_per_call
        Instances per CreateFleet call.
    cluster
        Tags the fleet records with the cluster, when given.
    on_launch
        Called with each batch of instances as it lands.
    throttle_backoff, capacity_backoff
        Backoff for throttling/5xx, and between passes once capacity ran out.
    single_zone
        Launch everything in one zone: each request lets EC2 pick the zone
        (``SingleAvailabilityZone``), and once one instance landed, later requests
        (the on-demand fallback, the next chunk) keep to its zone.

    Returns
    -------
    FleetResult
        Instances (id, type, zone, market), what is missing, and the failovers taken.

    Raises
    ------
    FleetLaunchError
        On an error no failover can fix; its ``result`` holds what had launched.
    """
    pools = make_pools(candidates, subnets)
    _check_inputs(pools, ami_by_arch, max_per_call)
    _warn_if_retrying(ec2)
    planner = FailoverPlanner(pools, spot_policy)
    if planner.market() is None:
        markets = " or ".join(planner.markets) or "no market (not a spot policy)"
        raise ProviderError(
            f"none of the instance types {sorted({p.vm_type for p in pools})} can be bought "
            f"on spot_policy={spot_policy!r}: {markets}. Fix: choose other types, or "
            "spot_policy='on-demand'"
        )
    result = FleetResult(requested=max(count, 0))
    deadline = time.monotonic() + capacity_retry_timeout
    waits = capacity_backoff.delays()
    launcher = _Launcher(
        ec2, template, ami_by_arch, cluster, result, on_launch, throttle_timeout, throttle_backoff
    )
    launcher.single_zone = single_zone
    while True:
        await _one_pass(launcher, planner, max_per_call)
        if result.missing and not planner.worth_retrying:
            # Every pool failed for a reason waiting cannot fix.
            if not result.instances:
                raise FleetLaunchError(_permanent_message(planner, result), result, _first(planner))
            break
        if not result.missing or time.monotonic() >= deadline:
            break
        # Every pool failed: capacity frees up over minutes, so wait, then look everywhere again.
        await asyncio.sleep(min(next(waits), max(deadline - time.monotonic(), 0)))
        planner.reset()
    if result.missing:
        logger.warning("EC2 Fleet: %s", result.summary())
    return result


def _check_inputs(pools: list[Pool], ami_by_arch: dict[str, str], max_per_call: int) -> None:
    if not pools:
        raise ProviderError("nothing to launch into: give at least one instance type and subnet")
    missing = sorted({p.arch for p in pools} - set(ami_by_arch))
    if missing:
        raise ProviderError(f"no AMI for architecture(s) {missing}: pass ami_by_arch[...] for them")
    if not 0 < max_per_call <= MAX_PER_FLEET:
        raise ProviderError(f"max_per_call must be in 1..{MAX_PER_FLEET}, not {max_per_call}")


def _warn_if_retrying(ec2: Any) -> None:
    config = getattr(getattr(ec2, "meta", None), "config", None)
    if config is None:  # not a botocore client: nothing to tell
        return
    retries = config.retries or {}
    if retries.get("total_max_attempts") != 1 and retries.get("max_attempts") != 0:
        logger.warning(
            "launch client retries on its own (%s): capacity errors (HTTP 500) will be sent "
            "again blindly; create it with retries={'total_max_attempts': 1}",
            retries,
        )


async def _one_pass(launcher: _Launcher, planner: FailoverPlanner, max_per_call: int) -> None:
    """Ask until nothing is missing or no pool is left, spot shortfalls going on-demand first."""
    result = launcher.result
    fallback = 0  # spot shortfall to ask for on-demand before trying spot again
    while result.missing:
        market = "on-demand" if fallback else planner.market()
        if market is None:
            return
        pools = planner.available(market)
        if not pools:  # on-demand was dropped too: the fallback is over for this pass
            fallback = 0
            continue
        n = min(fallback or result.missing, result.missing, max_per_call)
        launched, errors = await launcher.request(market, pools, n)
        if launcher.single_zone and launched and launched[0].zone:
            planner.keep_zone(launched[0].zone)
        fatal = next((e for e in errors if planner.fatal(e)), None)
        if fatal is not None:
            raise FleetLaunchError(_fatal_message(fatal, result), result, fatal.code)
        short = max(n - len(launched), 0)
        result.failovers += planner.record(market, errors, short)
        fallback = short if market == "spot" and planner.policy == "spot_with_fallback" else 0


class _Launcher:
    """Sends one CreateFleet request, retrying throttling and 5xx with the same token."""

    def __init__(
        self,
        ec2: Any,
        template: LaunchTemplate,
        ami_by_arch: dict[str, str],
        cluster: str | None,
        result: FleetResult,
        on_launch: OnLaunch | None,
        throttle_timeout: float,
        backoff: Backoff,
    ) -> None:
        self.ec2 = ec2
        self.template = template
        self.ami_by_arch = ami_by_arch
        self.cluster = cluster
        self.result = result
        self.on_launch = on_launch
        self.throttle_timeout = throttle_timeout
        self.backoff = backoff
        #: Let EC2 pick one zone for each request (``SingleAvailabilityZone``).
        self.single_zone = False

    async def request(
        self, market: str, pools: list[Pool], n: int
    ) -> tuple[list[LaunchedInstance], list[PoolError]]:
        params = fleet_request(
            self.template,
            pools,
            market,
            n,
            self.ami_by_arch,
            uuid.uuid4().hex,
            self.cluster,
            single_zone=self.single_zone,
        )
        try:
            response = await self._send(params)
        except ClientError as e:
            return [], [whole_call_error(error_code(e), error_message(e), market, pools)]
        launched, errors = parse_fleet_response(response, pools, market)
        self.result.instances += launched
        if launched and self.on_launch is not None:
            self.on_launch(launched)
        return launched, errors

    async def _send(self, params: dict[str, Any]) -> dict[str, Any]:
        async def send() -> dict[str, Any]:
            self.result.calls += 1
            return dict(await self.ec2.create_fleet(**params))

        # A template just made may be unknown to CreateFleet for a moment: a NotFound then
        # launched nothing, so the same request goes again (for SETTLE_TIMEOUT at most).
        settled = time.monotonic() + SETTLE_TIMEOUT
        throttled_until = time.monotonic() + self.throttle_timeout

        def retryable(error: Exception) -> bool:
            if not_found(error):
                return time.monotonic() < settled
            return _worth_sending_again(error) and time.monotonic() < throttled_until

        try:
            return await retry(
                send,
                retryable=retryable,
                timeout=max(self.throttle_timeout, SETTLE_TIMEOUT),
                backoff=self.backoff,
                what="EC2 CreateFleet",
            )
        except BotoCoreError as e:
            raise FleetLaunchError(f"EC2 CreateFleet failed: {e}", self.result) from e


def _worth_sending_again(error: Exception) -> bool:
    """Throttling, a 5xx, or no answer at all (the request may have landed: the same
    ClientToken makes sending it again safe)."""
    return isinstance(error, BotoCoreError) or error_code(error) in THROTTLING | TRANSIENT


def _first(planner: FailoverPlanner) -> str | None:
    return next(iter(planner.permanent), None)


def _permanent_message(planner: FailoverPlanner, result: FleetResult) -> str:
    """Every pool failed for good: each reason, and the fix of the first."""
    reasons = "; ".join(f"{e.where()}: {e.code}: {e.message}" for e in planner.permanent.values())
    code = _first(planner) or ""
    cause = _FIXES.get(code, "no other type, zone or market is left to try")
    return (
        f"EC2 CreateFleet launched none of {result.requested}: every pool failed: {reasons} "
        f"-- {cause}"
    )


def _fatal_message(error: PoolError, result: FleetResult) -> str:
    cause = _FIXES.get(error.code, "no other type, zone or market can fix this")
    launched = f" ({len(result.instances)} of {result.requested} launched before it)"
    return (
        f"EC2 CreateFleet failed for {error.where()}: {error.code}: {error.message} -- {cause}"
        + (launched if result.instances else "")
    )


# -- asking for the rest in the background ----------------------------------------------------


class FleetTopUp:
    """Keeps asking for a shortfall in the background, reporting each batch that lands.

    Parameters
    ----------
    launch
        ``launch(count, timeout, on_launch)`` -> FleetResult: usually a
        :func:`functools.partial` of :func:`launch_fleet` with everything but ``count``,
        ``capacity_retry_timeout`` and ``on_launch`` bound.
    count
        Instances still missing.
    timeout
        Seconds to keep asking (what is left of ``capacity_retry_timeout``).
    on_launch
        Called with each batch as it lands (the cluster adds those workers).
    first_delay
        Seconds to wait before the first try: the pass that just ran saw no capacity.

    Examples
    --------
    >>> result = await launch_fleet(ec2, count=100, capacity_retry_timeout=0, ...)  # doctest: +SKIP
    >>> if result.missing:
    ...     topup = FleetTopUp(partial(launch_fleet, ec2, ...), result.missing, 600, add)
    ...     topup.start()
    """

    def __init__(
        self,
        launch: Callable[..., Awaitable[FleetResult]],
        count: int,
        timeout: float,
        on_launch: OnLaunch,
        first_delay: float = 5.0,
    ) -> None:
        self.launch = launch
        self.count = count
        self.timeout = timeout
        self.on_launch = on_launch
        self.first_delay = first_delay
        self.task: asyncio.Task[FleetResult] | None = None

    def start(self) -> FleetTopUp:
        """Start asking in a task of the running loop (idempotent)."""
        if self.task is None:
            self.task = asyncio.ensure_future(self._run())
        return self

    async def _run(self) -> FleetResult:
        started = time.monotonic()
        await asyncio.sleep(min(self.first_delay, self.timeout))
        remaining = max(self.timeout - (time.monotonic() - started), 0.0)
        result = await self.launch(
            count=self.count, capacity_retry_timeout=remaining, on_launch=self.on_launch
        )
        logger.info("EC2 Fleet top-up: %s", result.summary())
        return result

    async def wait(self) -> FleetResult:
        """The top-up's result once it is over (raises what the launch raised)."""
        task = self.start().task
        assert task is not None
        return await task

    def stop(self) -> None:
        """Stop asking (scale-down or close); instances already reported stay the caller's."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
