"""Capacity pools for the local cloud, and EC2 launch calls that respect them as AWS does.

A :class:`CapacityModel` says how many more instances each capacity pool (instance type x
availability zone x market) can launch, and which types a zone does not offer. Nothing is
limited until a test or benchmark says so (:meth:`dask_rawvm.localcloud.LocalCloud.set_capacity`).

moto's own launch calls know nothing of capacity, and its CreateFleet is unfaithful (it uses
only the first override, never reports per-pool errors nor fulfils part of a fleet, and drops
the security groups of the template's network interface). :func:`create_instant_fleet`
answers CreateFleet (type ``instant``) in its place, driving moto's backend for everything
else, and :func:`admit_run_instances` makes RunInstances fail with
InsufficientInstanceCapacity (HTTP 500) or Unsupported when its pool cannot launch.
:mod:`.runtime` installs both as hooks on moto, for local-cloud accounts only.

Choices, where AWS cannot be copied exactly:

- Capacity taken by a launch does not come back when the instance terminates: a test that
  exhausts a pool keeps it exhausted until it restores capacity, whatever its cluster does.
- Each instance counts 1 towards a fleet's target (``WeightedCapacity`` is ignored), and
  ``MinTargetCapacity``/``SingleInstanceType`` are not honoured. ``SingleAvailabilityZone``
  is: the fleet launches from the pools of one zone, the one that can give the most (ties:
  the zone of the best-ranked pool), as EC2 picks a zone with capacity.
- RunInstances launches ``MinCount`` instances (moto's semantics) and answers
  InsufficientInstanceCapacity when its pool has fewer than that left.
- Launches are validated as EC2 validates them: an unknown instance type, an unknown AMI,
  or an AMI whose architecture the type cannot run is refused. moto checks the first two
  only with ``MOTO_EC2_ENABLE_INSTANCE_TYPE_VALIDATION``/``MOTO_ENABLE_AMI_VALIDATION`` set,
  read once at import for the whole process; here it is the local cloud's accounts only.
- A template's block-device mappings are applied to fleet instances after moto made them
  (moto's fleets ignore them): the root volume gets the mapping's size and type.
- What EC2 refuses and moto accepts can be turned on per cloud (:class:`LaunchRules`): spot
  launches refused for want of the spot service-linked role, and tag keys EC2 refuses when
  ``InstanceMetadataTags`` is enabled.
"""

from __future__ import annotations

import copy
import math
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from werkzeug.exceptions import HTTPException

from dask_rawvm.localcloud import iam
from dask_rawvm.localcloud.faults import ec2_error_body

MARKETS = ("on-demand", "spot")

# Per-account models: each LocalCloud has a moto account of its own.
_MODELS: dict[str, CapacityModel] = {}
_MODELS_LOCK = threading.Lock()


#: EC2's answer to a spot launch in an account without the spot service-linked role, by
#: credentials that may not create it (AWS's EC2 Spot documentation).
SPOT_ROLE_REFUSAL = (
    "AuthFailure.ServiceLinkedRoleCreationNotPermitted",
    "The provided credentials do not have permission to create the service-linked role for "
    "EC2 Spot Instances.",
)


@dataclass
class LaunchRules:
    """What EC2 refuses that moto accepts: off until a test turns it on."""

    #: ``(code, message)`` every spot launch is refused with, per pool in an instant fleet's
    #: ``Errors`` (as EC2 reports the spot service-linked role missing), or None.
    spot_refusal: tuple[str, str] | None = None
    #: Refuse launches whose instance tag keys EC2 refuses with ``InstanceMetadataTags``
    #: enabled (spaces, ``/``, ``.``, ``..``, ``_index``).
    metadata_tag_keys: bool = False
    #: Seconds an instance profile just made stays unknown to launches (IAM's changes reach
    #: EC2 after a while); 0: at once. A profile that does not exist is always refused.
    profile_propagation: float = 0.0


def profile_refusal(backend: Any, profile: dict[str, str] | None, rules: LaunchRules) -> str | None:
    """EC2's message refusing a launch's instance profile (``{"Arn": ...}`` or
    ``{"Name": ...}``): one that does not exist, or is younger than the propagation delay."""
    if not profile:
        return None
    found = _find_profile(backend, profile)
    if found is not None:
        age = (datetime.now(timezone.utc) - _aware(found.create_date)).total_seconds()
        if age >= rules.profile_propagation:
            return None
    key, value = ("arn", profile["Arn"]) if "Arn" in profile else ("name", profile.get("Name"))
    kind = "ARN" if key == "arn" else "name"
    return (
        f"Value ({value}) for parameter iamInstanceProfile.{key} is invalid. Invalid IAM "
        f"Instance Profile {kind}"
    )


def profile_roles(backend: Any, profile: dict[str, str] | None) -> list[str]:
    """The ARNs of the roles of a launch's instance profile (those the caller passes)."""
    found = _find_profile(backend, profile) if profile else None
    return [r.arn for r in found.roles] if found is not None else []


def _find_profile(backend: Any, profile: dict[str, str]) -> Any:
    """moto's instance profile a launch names by ``Arn`` or ``Name``, or None."""
    from moto.iam.models import iam_backends

    profiles = iam_backends[backend.account_id]["aws"].instance_profiles.values()
    if "Arn" in profile:
        return next((p for p in profiles if p.arn == profile["Arn"]), None)
    return next((p for p in profiles if p.name == profile.get("Name")), None)


def _aware(when: datetime) -> datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def metadata_tag_key_error(tags: Iterable[str]) -> str | None:
    """Why EC2 would refuse these instance tag keys with ``InstanceMetadataTags`` enabled
    (None when it would not). AWS documents: letters, digits and ``+ - = . , _ : @`` only;
    no spaces or ``/``; not ``.``, ``..`` or ``_index``."""
    bad = sorted(k for k in tags if " " in k or "/" in k or k in (".", "..", "_index"))
    if not bad:
        return None
    return (
        f"The tag key(s) {', '.join(repr(k) for k in bad)} are not allowed when instance "
        "metadata tags are enabled (InstanceMetadataTags): tag keys may not contain spaces "
        "or '/', nor be '.', '..' or '_index'."
    )


@dataclass(frozen=True)
class PoolKey:
    """A capacity limit's scope; ``None`` in a field matches every value of it."""

    instance_type: str | None = None
    zone: str | None = None
    market: str | None = None

    def covers(self, instance_type: str, zone: str, market: str) -> bool:
        return (
            self.instance_type in (None, instance_type)
            and self.zone in (None, zone)
            and self.market in (None, market)
        )


class CapacityModel:
    """How many more instances each capacity pool can launch (thread-safe).

    A limit applies to every pool its :class:`PoolKey` covers, so
    ``set_limit(zone="us-east-1a", count=5)`` lets the whole zone launch 5 more instances,
    whatever their type and market. A launch consumes from every limit covering its pool;
    a pool is as available as the tightest of them, and unlimited when none covers it.

    Examples
    --------
    >>> model = CapacityModel()
    >>> model.set_limit("m6i.large", "us-east-1a", "spot", count=3)
    >>> model.take("m6i.large", "us-east-1a", "spot", 5)
    3
    >>> model.available("m6i.large", "us-east-1a", "spot")
    0
    >>> model.available("m6i.large", "us-east-1b", "spot") is None  # no limit covers it
    True
    >>> model.restore()
    >>> model.available("m6i.large", "us-east-1a", "spot") is None
    True
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limits: dict[PoolKey, int] = {}
        self._unsupported: set[PoolKey] = set()
        # ClientToken -> the answer of the instant fleet it made (CreateFleet is idempotent).
        self._fleets: dict[str, dict[str, Any]] = {}
        #: What EC2 refuses that moto accepts, as a test turned it on.
        self.rules = LaunchRules()

    def set_limit(
        self,
        instance_type: str | None = None,
        zone: str | None = None,
        market: str | None = None,
        count: int | None = 0,
    ) -> None:
        """Let the pools a scope covers launch ``count`` more instances (None: no limit)."""
        if market not in (None, *MARKETS):
            raise ValueError(f"market must be one of {MARKETS} or None, not {market!r}")
        key = PoolKey(instance_type, zone, market)
        with self._lock:
            if count is None:
                self._limits.pop(key, None)
            else:
                self._limits[key] = max(int(count), 0)

    def set_unsupported(self, instance_type: str, zone: str | None = None) -> None:
        """Make ``instance_type`` unavailable in ``zone`` (every zone when None): AWS's
        ``Unsupported``. Restoring capacity does not undo it."""
        with self._lock:
            self._unsupported.add(PoolKey(instance_type, zone))

    def restore(self) -> None:
        """Lift every capacity limit (capacity has come back everywhere)."""
        with self._lock:
            self._limits.clear()

    def supported(self, instance_type: str, zone: str) -> bool:
        with self._lock:
            return not any(k.covers(instance_type, zone, "") for k in self._unsupported)

    def available(self, instance_type: str, zone: str, market: str) -> int | None:
        """Instances the pool can still launch; None when no limit covers it."""
        with self._lock:
            return self._available(instance_type, zone, market)

    def _available(self, instance_type: str, zone: str, market: str) -> int | None:
        left = [n for k, n in self._limits.items() if k.covers(instance_type, zone, market)]
        return min(left) if left else None

    def take(
        self, instance_type: str, zone: str, market: str, count: int, *, at_least: int = 0
    ) -> int:
        """Consume up to ``count`` instances of a pool; return how many it granted.

        Grants nothing when fewer than ``at_least`` are left (RunInstances' ``MinCount``).
        """
        with self._lock:
            left = self._available(instance_type, zone, market)
            granted = count if left is None else min(count, left)
            if granted < at_least or granted <= 0:
                return 0
            for key in self._limits:
                if key.covers(instance_type, zone, market):
                    self._limits[key] -= granted
            return granted

    def give_back(self, instance_type: str, zone: str, market: str, count: int) -> None:
        """Return what a launch took but did not use (the launch failed)."""
        with self._lock:
            for key in self._limits:
                if key.covers(instance_type, zone, market):
                    self._limits[key] += count

    def fleet_answer(self, client_token: str | None) -> dict[str, Any] | None:
        """The answer already given to an instant fleet with this ClientToken, if any."""
        if not client_token:
            return None
        with self._lock:
            answer = self._fleets.get(client_token)
        return copy.deepcopy(answer) if answer is not None else None

    def remember_fleet(self, client_token: str | None, answer: dict[str, Any]) -> None:
        if client_token:
            with self._lock:
                self._fleets[client_token] = copy.deepcopy(answer)


def register(account_id: str, model: CapacityModel) -> None:
    """Make ``model`` the capacity of a moto account's launches."""
    with _MODELS_LOCK:
        _MODELS[account_id] = model


def unregister(account_id: str) -> None:
    with _MODELS_LOCK:
        _MODELS.pop(account_id, None)


def model_for(account_id: str) -> CapacityModel | None:
    """The capacity model of a local-cloud account; None for any other moto account."""
    with _MODELS_LOCK:
        return _MODELS.get(account_id)


# -- errors, worded as EC2 words them ---------------------------------------------------------


class LaunchError(HTTPException):
    """An EC2 error answered with the HTTP status AWS uses for it.

    moto serializes its own EC2 errors as HTTP 400; InsufficientInstanceCapacity is a 500,
    which is what makes botocore retry it by default.
    """

    def __init__(self, error_code: str, message: str, status: int = 400) -> None:
        super().__init__(description=ec2_error_body(error_code, message).decode())
        self.code = status
        self.error_code = error_code

    def get_headers(self, *args: Any, **kwargs: Any) -> list[tuple[str, str]]:
        return [("Content-Type", "text/xml")]


def ice_message(instance_type: str, zone: str, others: Iterable[str]) -> str:
    """InsufficientInstanceCapacity, as EC2 words it for RunInstances and on-demand fleets."""
    message = (
        f"We currently do not have sufficient {instance_type} capacity in the Availability "
        f"Zone you requested ({zone}). Our system will be working on provisioning additional "
        f"capacity. You can currently get {instance_type} capacity by not specifying an "
        "Availability Zone in your request"
    )
    others = list(others)
    return message + (f" or choosing {', '.join(others)}." if others else ".")


SPOT_ICE_MESSAGE = "There is no Spot capacity available that matches your request."


def unsupported_message(instance_type: str, zone: str, others: Iterable[str]) -> str:
    others = list(others)
    return (
        f"Your requested instance type ({instance_type}) is not supported in your requested "
        f"Availability Zone ({zone}). Please retry your request by not specifying an "
        "Availability Zone" + (f" or choosing {', '.join(others)}." if others else ".")
    )


def _other_zones(
    backend: Any, model: CapacityModel, instance_type: str, zone: str, market: str
) -> list[str]:
    """The region's zones that offer ``instance_type`` and have capacity for it left."""
    from moto.ec2.models.instance_types import INSTANCE_TYPE_OFFERINGS

    offered = {
        o["Location"]
        for o in INSTANCE_TYPE_OFFERINGS["availability-zone"].get(backend.region_name, [])
        if o["InstanceType"] == instance_type
    }
    return sorted(
        z
        for z in offered - {zone}
        if model.supported(instance_type, z) and model.available(instance_type, z, market) != 0
    )


# -- validation (what moto checks only when told to) ------------------------------------------


def validation_error(backend: Any, instance_type: str | None, image_id: str | None) -> Any:
    """The moto error EC2 would answer for this type and AMI, or None when they can launch."""
    from moto.ec2.exceptions import EC2ClientError, InvalidAMIIdError
    from moto.ec2.models.instance_types import INSTANCE_TYPES

    known = INSTANCE_TYPES.get(instance_type) if instance_type else None
    if instance_type and known is None:
        return EC2ClientError(
            "InvalidParameterValue", f"Invalid value '{instance_type}' for InstanceType."
        )
    if not image_id:
        return None
    images = backend.describe_images(filters={"image-id": image_id})
    if not images:
        return InvalidAMIIdError(image_id)
    can_run = (known or {}).get("ProcessorInfo", {}).get("SupportedArchitectures", [])
    arch = images[0].architecture
    if can_run and arch not in can_run:
        return EC2ClientError(
            "InvalidParameterValue",
            f"The architecture '{can_run[0]}' of the specified instance type does not match "
            f"the architecture '{arch}' of the specified AMI. Specify an instance type and an "
            "AMI that have matching architectures, and try again. You can use "
            "'describe-instance-types' or 'describe-images' to discover the architecture of "
            "the instance type or AMI.",
        )
    return None


# -- RunInstances -------------------------------------------------------------------------------


def _zone_of_run(backend: Any, response: Any) -> str:
    """The zone moto will put a RunInstances launch in (the rules of moto's Instance)."""
    subnet_id = response._get_param("SubnetId") or next(
        (n["SubnetId"] for n in response._get_param("NetworkInterfaces", []) if "SubnetId" in n),
        None,
    )
    if subnet_id:
        return str(backend.get_subnet(subnet_id).availability_zone)
    return str(response._get_param("Placement.AvailabilityZone") or backend.region_name + "a")


def admit_run_instances(response: Any, model: CapacityModel) -> Callable[[], None]:
    """Validate a RunInstances call and take its capacity; return how to give it back.

    Raises
    ------
    LaunchError
        InsufficientInstanceCapacity (HTTP 500) when the pool has fewer than ``MinCount``
        instances left; Unsupported (HTTP 400) when the zone does not offer the type.
    """
    backend = response.ec2_backend
    given_type = response._get_param("InstanceType")
    error = validation_error(backend, given_type, response._get_param("ImageId"))
    if error is not None:
        raise error
    instance_type = given_type or "m1.small"  # moto's default type
    zone = _zone_of_run(backend, response)
    spot = response._get_param("InstanceMarketOptions.MarketType") == "spot"
    market = "spot" if spot else "on-demand"
    _check_rules(
        model.rules,
        response._get_param("MetadataOptions", {}) or {},
        response._get_param("TagSpecifications", []) or [],
    )
    if spot and model.rules.spot_refusal is not None:
        raise LaunchError(*model.rules.spot_refusal, status=403)
    count = int(response._get_param("MinCount", if_none="1"))
    if not model.supported(instance_type, zone):
        others = _other_zones(backend, model, instance_type, zone, market)
        raise LaunchError("Unsupported", unsupported_message(instance_type, zone, others))
    if not model.take(instance_type, zone, market, count, at_least=count):
        others = _other_zones(backend, model, instance_type, zone, market)
        raise LaunchError(
            "InsufficientInstanceCapacity", ice_message(instance_type, zone, others), 500
        )
    return lambda: model.give_back(instance_type, zone, market, count)


def _check_rules(
    rules: LaunchRules, metadata: dict[str, Any], tag_specifications: list[dict[str, Any]]
) -> None:
    """Refuse a launch the rules turned on forbid (a whole-call error, as EC2's)."""
    if not rules.metadata_tag_keys or metadata.get("InstanceMetadataTags") != "enabled":
        return
    keys = [
        tag["Key"]
        for spec in tag_specifications
        if spec.get("ResourceType") == "instance"
        for tag in spec.get("Tags", [])
    ]
    problem = metadata_tag_key_error(keys)
    if problem is not None:
        raise LaunchError("InvalidParameterValue", problem)


# -- CreateFleet (instant) ----------------------------------------------------------------------


@dataclass
class _Pool:
    """One override of an instant fleet: a launch spec moto built, where it lands, its rank."""

    spec: Any  # moto's SpotFleetLaunchSpec (template data merged with the override)
    zone: str
    priority: float
    position: int
    #: What each market launched here, and why it could not launch more.
    instance_ids: dict[str, list[str]] = field(default_factory=dict)
    errors: dict[str, tuple[str, str]] = field(default_factory=dict)

    def described(self) -> dict[str, Any]:
        """``LaunchTemplateAndOverrides`` as AWS echoes it, the zone filled in."""
        overrides = {**(self.spec.overrides or {}), "AvailabilityZone": self.zone}
        return {
            "LaunchTemplateSpecification": self.spec.launch_template_spec,
            "Overrides": overrides,
        }


def _fleet_params(response: Any) -> dict[str, Any]:
    """moto's own parsing of CreateFleet (see ``moto.ec2.responses.fleets``)."""
    return {
        "on_demand_options": response._get_param("OnDemandOptions", {}),
        "spot_options": response._get_param("SpotOptions", {}),
        "target_capacity_specification": response._get_param("TargetCapacitySpecification", {}),
        "launch_template_configs": response._get_param("LaunchTemplateConfigs", []),
        "excess_capacity_termination_policy": response._get_param(
            "ExcessCapacityTerminationPolicy"
        ),
        "replace_unhealthy_instances": response._get_param("ReplaceUnhealthyInstances"),
        "terminate_instances_with_expiration": response._get_param(
            "TerminateInstancesWithExpiration", if_none=True
        ),
        "fleet_type": response._get_param("Type", if_none="maintain"),
        "valid_from": response._get_param("ValidFrom"),
        "valid_until": response._get_param("ValidUntil"),
        "tag_specifications": response._get_param("TagSpecifications", []),
    }


def market_targets(spec: dict[str, Any]) -> dict[str, int]:
    """Instances wanted per market: explicit on-demand/spot targets, the rest on the default."""
    total = int(spec.get("TotalTargetCapacity") or 0)
    targets = {
        "on-demand": int(spec.get("OnDemandTargetCapacity") or 0),
        "spot": int(spec.get("SpotTargetCapacity") or 0),
    }
    default = spec.get("DefaultTargetCapacityType") or "on-demand"
    targets[default] += max(total - sum(targets.values()), 0)
    return targets


def create_instant_fleet(response: Any, model: CapacityModel) -> Any:
    """Answer CreateFleet (``Type=instant``) as EC2 does, on moto's backend.

    Every override of every launch-template config is a pool. Pools are tried best first
    until the target is met, each giving what it has left:

    - on-demand, ``prioritized``: lowest ``Priority`` first (no Priority: last), ties in
      request order. ``lowest-price`` is approximated by the same order (no price data).
    - spot, ``price-capacity-optimized``, ``capacity-optimized(-prioritized)`` and
      ``lowest-price``: approximated by Priority, then the pool with the most capacity left.
      ``diversified`` spreads the target evenly over the pools, then fills in that order.

    A pool that was tried and could not give all that was asked of it (exhausted,
    unsupported in its zone, or an invalid type/AMI) is reported in ``Errors``; what did
    launch is in ``Instances``, grouped by override and market. Partial fulfilment is a
    success (HTTP 200), as for AWS's instant fleets. The same ClientToken gets the same
    answer without launching again.

    Instances get the template's user-data, tags and security groups (its
    ``NetworkInterfaces[0].Groups``, ``SecurityGroupIds`` and ``SecurityGroups``), shutdown
    behaviour, metadata options and key, and the override's type, AMI and subnet. Spot
    instances are launched through moto's spot requests, so DescribeInstances reports them
    with ``InstanceLifecycle: spot`` and DescribeSpotInstanceRequests lists them.
    """
    from moto.core.responses import ActionResult

    client_token = response._get_param("ClientToken")
    response.error_on_dryrun()
    answer = model.fleet_answer(client_token)
    if answer is not None:
        return ActionResult(answer)
    backend = response.ec2_backend
    params = _fleet_params(response)
    target_spec = params["target_capacity_specification"]
    # moto launches at construction: build the fleet asking for nothing, then launch here.
    nothing = {
        **target_spec,
        "TotalTargetCapacity": 0,
        "OnDemandTargetCapacity": 0,
        "SpotTargetCapacity": 0,
    }
    fleet = backend.create_fleet(**{**params, "target_capacity_specification": nothing})
    fleet.target_capacity_specification = target_spec
    fleet.target_capacity = int(target_spec.get("TotalTargetCapacity") or 0)
    pools = [_pool(backend, spec, i) for i, spec in enumerate(fleet.launch_specs)]
    for pool in pools[:1]:  # one template per fleet here: its rules are the fleet's
        data = _template_data(backend, pool.spec)
        _check_rules(
            model.rules, data.get("MetadataOptions") or {}, data.get("TagSpecifications") or []
        )
        # EC2 checks that the caller may pass the instance profile's role to it.
        denied = iam.check_pass_role(
            response, profile_roles(backend, data.get("IamInstanceProfile"))
        )
        if denied is not None:
            raise LaunchError("UnauthorizedOperation", denied, 403)
    for market, wanted in market_targets(target_spec).items():
        if wanted:
            options = params["spot_options"] if market == "spot" else params["on_demand_options"]
            eligible = pools
            if _true((options or {}).get("SingleAvailabilityZone")):
                eligible = _single_zone(model, pools, market, wanted)
            _fill(backend, model, fleet, eligible, market, wanted, _strategy(params, market))
    answer = {
        "FleetId": fleet.id,
        "Errors": [
            {
                "LaunchTemplateAndOverrides": pool.described(),
                "Lifecycle": market,
                "ErrorCode": code,
                "ErrorMessage": message,
            }
            for pool in pools
            for market, (code, message) in pool.errors.items()
        ],
        "Instances": [
            {
                "LaunchTemplateAndOverrides": pool.described(),
                "Lifecycle": market,
                "InstanceIds": ids,
                "InstanceType": pool.spec.instance_type,
            }
            for pool in pools
            for market, ids in pool.instance_ids.items()
        ],
    }
    model.remember_fleet(client_token, answer)
    return ActionResult(answer)


def _true(value: Any) -> bool:
    return value is True or str(value).lower() == "true"


def _single_zone(model: CapacityModel, pools: list[_Pool], market: str, wanted: int) -> list[_Pool]:
    """The pools of the one zone a ``SingleAvailabilityZone`` fleet launches in: the zone
    that can give the most of ``wanted``, ties going to the zone of the best-ranked pool."""
    zones: dict[str, list[_Pool]] = {}
    for pool in sorted(pools, key=lambda p: (p.priority, p.position)):
        zones.setdefault(pool.zone, []).append(pool)

    def room(pool: _Pool) -> float:
        if not model.supported(pool.spec.instance_type, pool.zone):
            return 0
        left = model.available(pool.spec.instance_type, pool.zone, market)
        return math.inf if left is None else left

    def gives(zone_pools: list[_Pool]) -> float:
        return min(sum(room(p) for p in zone_pools), wanted)

    best = max(zones.values(), key=gives, default=[])  # max keeps the first of equals
    return best


def _strategy(params: dict[str, Any], market: str) -> str:
    options = params["spot_options"] if market == "spot" else params["on_demand_options"]
    default = "price-capacity-optimized" if market == "spot" else "lowest-price"
    return str((options or {}).get("AllocationStrategy") or default)


def _pool(backend: Any, spec: Any, position: int) -> _Pool:
    overrides = spec.overrides or {}
    if spec.subnet_id:
        zone = backend.get_subnet(spec.subnet_id).availability_zone
    else:
        zone = overrides.get("AvailabilityZone") or backend.region_name + "a"
    priority = overrides.get("Priority")
    return _Pool(spec, zone, math.inf if priority is None else float(priority), position)


def _ordered(model: CapacityModel, pools: list[_Pool], market: str, strategy: str) -> list[_Pool]:
    def room(pool: _Pool) -> float:
        left = model.available(pool.spec.instance_type, pool.zone, market)
        return math.inf if left is None else left

    if market == "spot" and strategy != "diversified":
        return sorted(pools, key=lambda p: (p.priority, -room(p), p.position))
    return sorted(pools, key=lambda p: (p.priority, p.position))


def _fill(
    backend: Any,
    model: CapacityModel,
    fleet: Any,
    pools: list[_Pool],
    market: str,
    wanted: int,
    strategy: str,
) -> None:
    """Launch ``wanted`` instances of ``market`` from the pools, best first."""
    ordered = _ordered(model, pools, market, strategy)
    if strategy == "diversified" and ordered:
        # An even split first (the best pools get one more), then the rest in order.
        shares = [wanted // len(ordered) + (i < wanted % len(ordered)) for i in range(len(ordered))]
        for pool, share in zip(ordered, shares, strict=True):
            wanted -= _launch_from(backend, model, fleet, pool, market, share)
    for pool in ordered:
        if wanted <= 0:
            return
        if market not in pool.errors:
            wanted -= _launch_from(backend, model, fleet, pool, market, wanted)


def _fail(pool: _Pool, market: str, code: str, message: str) -> int:
    pool.errors[market] = (code, message)
    return 0


def _launch_from(
    backend: Any, model: CapacityModel, fleet: Any, pool: _Pool, market: str, count: int
) -> int:
    """Launch up to ``count`` instances from one pool; record an error for what it lacked."""
    if count <= 0:
        return 0
    spec = pool.spec
    invalid = validation_error(backend, spec.instance_type, spec.image_id)
    if invalid is not None:
        return _fail(pool, market, invalid.code, invalid.message)
    refused = profile_refusal(
        backend, _template_data(backend, spec).get("IamInstanceProfile"), model.rules
    )
    if refused is not None:
        return _fail(pool, market, "InvalidParameterValue", refused)
    if market == "spot" and model.rules.spot_refusal is not None:
        return _fail(pool, market, *model.rules.spot_refusal)
    if not model.supported(spec.instance_type, pool.zone):
        others = _other_zones(backend, model, spec.instance_type, pool.zone, market)
        return _fail(
            pool, market, "Unsupported", unsupported_message(spec.instance_type, pool.zone, others)
        )
    granted = model.take(spec.instance_type, pool.zone, market, count)
    if granted:
        try:
            ids = _launch(backend, fleet, pool, market, granted)
        except Exception:
            model.give_back(spec.instance_type, pool.zone, market, granted)
            raise
        pool.instance_ids.setdefault(market, []).extend(ids)
    if granted < count:
        others = _other_zones(backend, model, spec.instance_type, pool.zone, market)
        message = (
            SPOT_ICE_MESSAGE
            if market == "spot"
            else ice_message(spec.instance_type, pool.zone, others)
        )
        _fail(pool, market, "InsufficientInstanceCapacity", message)
    return granted


def _template_data(backend: Any, spec: Any) -> dict[str, Any]:
    reference = spec.launch_template_spec or {}
    template = backend.get_launch_template(reference["LaunchTemplateId"])
    return dict(template.get_version(reference.get("Version")).data)


def _security_groups(backend: Any, data: dict[str, Any]) -> list[str]:
    """The template's groups, by id: its primary interface's, ``SecurityGroupIds``, and
    ``SecurityGroups`` (names)."""
    nics = data.get("NetworkInterfaces") or [{}]
    primary = next((n for n in nics if int(n.get("DeviceIndex", 0)) == 0), nics[0])
    ids = [*primary.get("Groups", []), *data.get("SecurityGroupIds", [])]
    for name in data.get("SecurityGroups", []):
        group = backend.get_security_group_by_name_or_id(name)
        if group is not None:
            ids.append(group.id)
    return list(dict.fromkeys(ids))


def _launch(backend: Any, fleet: Any, pool: _Pool, market: str, count: int) -> list[str]:
    """Launch ``count`` instances of one pool through moto's backend; return their ids."""
    from moto.ec2.models.instances import MetadataOptions

    spec = pool.spec
    data = _template_data(backend, spec)
    groups = _security_groups(backend, data)
    shutdown = data.get("InstanceInitiatedShutdownBehavior")
    metadata = data.get("MetadataOptions") or {}
    placement = None if spec.subnet_id else pool.zone
    if market == "spot":
        requests = backend.request_spot_instances(
            price=spec.spot_price,
            image_id=spec.image_id,
            count=count,
            spot_instance_type="one-time",
            valid_from=None,
            valid_until=None,
            launch_group=None,
            availability_zone_group=None,
            key_name=spec.key_name,
            security_groups=groups,
            user_data=spec.user_data,
            instance_type=spec.instance_type,
            placement=placement,
            kernel_id=None,
            ramdisk_id=None,
            monitoring_enabled=bool(spec.monitoring_enabled),
            subnet_id=spec.subnet_id,
            tags=spec.tag_specifications,
            spot_fleet_id=fleet.id,
            launch_spec=spec,
        )
        instances = [r.instance for r in requests]
        # moto's spot requests carry no shutdown behaviour nor metadata options; the
        # runtime boots these instances only after this call, so they see what EC2 gives.
        for instance in instances:
            instance.instance_initiated_shutdown_behavior = shutdown or "terminate"
            instance.metadata_options = MetadataOptions(metadata)
        fleet.spot_requests.extend(requests)
        fleet.fulfilled_spot_capacity = getattr(fleet, "fulfilled_spot_capacity", 0.0) + count
    else:
        reservation = backend.run_instances(
            spec.image_id,
            count,
            spec.user_data,
            [],
            instance_type=spec.instance_type,
            is_instance_type_default=False,
            region_name=backend.region_name,
            subnet_id=spec.subnet_id,
            placement=placement,
            key_name=spec.key_name,
            security_group_ids=groups,
            tags=spec.tag_specifications,
            fleet_id=fleet.id,
            instance_initiated_shutdown_behavior=shutdown,
            metadata_options=metadata,
        )
        instances = reservation.instances
        fleet.on_demand_instances += [
            {"id": reservation.id, "instance": i, "launch_spec": spec} for i in instances
        ]
        fleet.fulfilled_on_demand_capacity += count
    fleet.fulfilled_capacity += count
    _apply_block_devices(backend, instances, data.get("BlockDeviceMappings") or [])
    profile = data.get("IamInstanceProfile") or {}
    for instance in instances if profile else []:  # their metadata serves its role's keys
        backend.associate_iam_instance_profile(
            instance.id,
            iam_instance_profile_name=profile.get("Name"),
            iam_instance_profile_arn=profile.get("Arn"),
        )
    return [i.id for i in instances]


def _apply_block_devices(
    backend: Any, instances: list[Any], mappings: list[dict[str, Any]]
) -> None:
    """Give fleet instances the template's EBS mappings (moto's fleets give every instance
    its default 8 GiB volume): the image's root device gets the mapping's size and type."""
    for mapping in mappings:
        ebs = mapping.get("Ebs") or {}
        device = mapping.get("DeviceName")
        if not ebs or not device:
            continue
        for instance in instances:
            attached = dict(instance.get_block_device_mapping)
            # moto attaches its default root volume at /dev/sda1 whatever the image says.
            root = attached.get(device) or (
                attached.get("/dev/sda1") if device == instance.root_device_name else None
            )
            if root is None:
                continue
            volume = backend.get_volume(root.volume_id)
            if ebs.get("VolumeSize") is not None:
                volume.size = int(ebs["VolumeSize"])
            if ebs.get("VolumeType"):
                volume.volume_type = ebs["VolumeType"]
            if device not in attached:  # the mapping's name, as EC2 reports the root device
                instance.block_device_mapping[device] = instance.block_device_mapping.pop(
                    "/dev/sda1"
                )
            root.delete_on_termination = _true(ebs.get("DeleteOnTermination", True))
