"""A local cloud as strict as EC2, where a test asks for it.

moto is kinder than EC2. Each switch here makes the local cloud answer as EC2 does in one
respect AWS documents, so a test can show that dask-rawvm survives it. Each is a method
of :class:`~dask_rawvm.localcloud.LocalCloud` (:class:`LocalStrictness`), the same method
of :class:`~dask_rawvm.localcloud.RemoteCloud` (:class:`RemoteStrictness`) and a verb of
the control API (:func:`control`):

==================================  ===================================================
``eventual_consistency(calls=k)``   an instance, security group or launch template just
                                    made is ``...NotFound`` for the next ``k`` calls that
                                    name it (EC2's eventual consistency)
``imds_token_ttl(seconds)``         IMDSv2 tokens expire after at most ``seconds`` (401
                                    after), the 6 h of EC2 compressed for a test
``refuse_metadata_tag_keys()``      launches with ``InstanceMetadataTags`` enabled are
                                    refused for tag keys with spaces or ``/``
``remove_default_vpc()``            the account has no default VPC (it becomes an
                                    ordinary VPC, whose id is returned)
``refuse_spot_service_linked_role``  every spot pool answers
                                    ``AuthFailure.ServiceLinkedRoleCreationNotPermitted``
``iam_propagation(seconds)``        an instance profile made less than ``seconds`` ago
                                    is an invalid profile to launches (IAM's changes
                                    reach EC2 after a while)
``deny(action)``                    the action answers ``UnauthorizedOperation``
``paginate(page_size)``             listings come in pages with a ``NextToken`` (S3
                                    ListBuckets: a ``ContinuationToken``)
``set_quota(code, vcpus)``          an EC2 vCPU quota in Service Quotas
``enforce_iam()``                   every request checked against its caller's IAM
                                    policies (process-global: see :mod:`.iam`)
``create_identity(name, policy)``   an IAM user holding ``policy``; its access key
``strict(...)``                     all of the above that a cluster must survive, at once
==================================  ===================================================
"""

from __future__ import annotations

import copy
import functools
import io
import re
import threading
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import parse_qs

from dask_rawvm.localcloud import iam, imds, quotas
from dask_rawvm.localcloud.capacity import SPOT_ROLE_REFUSAL, CapacityModel
from dask_rawvm.localcloud.faults import FaultInjector, ec2_error_body, request_of

StartResponse = Callable[[str, list[tuple[str, str]]], Any]

#: Creations whose resources stay invisible for a while, and how their ids look.
CREATED_IDS = {
    "RunInstances": re.compile(r">(i-[0-9a-f]{8,17})<"),
    "CreateFleet": re.compile(r">(i-[0-9a-f]{8,17})<"),
    "CreateSecurityGroup": re.compile(r">(sg-[0-9a-f]{8,17})<"),
    "CreateLaunchTemplate": re.compile(r">(lt-[0-9a-f]{8,17})<"),
}
#: Parameters that name an instance, a security group or a launch template.
REFERENCE = re.compile(
    r"^(InstanceId(\.\d+)?|GroupId(\.\d+)?|LaunchTemplateId(\.\d+)?"
    r"|LaunchTemplateConfigs\.\d+\.LaunchTemplateSpecification\.LaunchTemplateId)$"
)
#: EC2's answer for an id it does not (yet) know, by the id's prefix.
NOT_FOUND = {
    "i-": ("InvalidInstanceID.NotFound", "The instance ID '{}' does not exist"),
    "sg-": ("InvalidGroup.NotFound", "The security group '{}' does not exist"),
    "lt-": (
        "InvalidLaunchTemplateId.NotFound",
        "The specified launch template, with template ID {}, does not exist.",
    ),
}
#: EC2 listings paged by :meth:`LocalStrictness.paginate` (DescribeInstanceTypes and
#: DescribeSpotPriceHistory are left whole: hundreds of pages would only slow tests down).
PAGED = frozenset(
    {
        "DescribeInstances",
        "DescribeSecurityGroups",
        "DescribeSecurityGroupRules",
        "DescribeLaunchTemplates",
        "DescribeLaunchTemplateVersions",
        "DescribeSubnets",
        "DescribeVpcs",
        "DescribeVolumes",
    }
)
_TOKEN_PREFIX = "localcloud-page-"


class Strictness:
    """Eventual consistency and paging of one local cloud (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        #: Each new resource is not found by this many calls naming it (0: off).
        self.consistency_calls = 0
        #: Items per page of a listing (None: off).
        self.page_size: int | None = None
        self._unseen: dict[str, int] = {}  # resource id -> NotFound answers left
        self._pages: dict[str, tuple[ET.Element, str, list[ET.Element], str]] = {}

    # -- eventual consistency --------------------------------------------------------
    def created(self, action: str, body: bytes) -> None:
        """Resources an answer reports made: unseen by the next calls naming them."""
        if not self.consistency_calls:
            return
        ids = CREATED_IDS[action].findall(body.decode("utf-8", "replace"))
        with self._lock:
            self._unseen.update(dict.fromkeys(ids, self.consistency_calls))

    def unseen(self, params: dict[str, str]) -> list[str]:
        """Ids a call names that EC2 would not find yet (each such call counts once)."""
        named = [v for k, v in params.items() if REFERENCE.match(k)]
        with self._lock:
            found = [i for i in named if self._unseen.get(i, 0) > 0]
            for resource in found:
                self._unseen[resource] -= 1
        return found

    # -- paging ----------------------------------------------------------------------
    def page(self, body: bytes, list_name: str, token_name: str) -> bytes:
        """The first page of a listing, the rest kept for the token it ends with."""
        assert self.page_size is not None
        root = ET.fromstring(body)
        listing = _child(root, list_name)
        if listing is None or _child(root, token_name) is not None:
            return body  # not a listing, or moto paged it already
        items = list(listing)
        if len(items) <= self.page_size:
            return body
        for item in items:
            listing.remove(item)
        return self._next(root, list_name, items, token_name)

    def next_page(self, token: str) -> bytes | None:
        """The page after ``token``, or None when the token is not one of this cloud's."""
        with self._lock:
            kept = self._pages.pop(token, None)
        if kept is None:
            return None
        root, list_name, items, token_name = kept
        return self._next(copy.deepcopy(root), list_name, items, token_name)

    def _next(self, root: ET.Element, list_name: str, items: list[ET.Element], token: str) -> bytes:
        """``root`` (its list empty, no token) with the next page of ``items``; the rest kept."""
        assert self.page_size is not None
        rest = items[self.page_size :]
        if rest:
            key = f"{_TOKEN_PREFIX}{uuid.uuid4().hex}"
            with self._lock:
                self._pages[key] = (copy.deepcopy(root), list_name, rest, token)
            namespace = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
            ET.SubElement(root, f"{namespace}{token}").text = key
        listing = _child(root, list_name)
        assert listing is not None
        listing.extend(items[: self.page_size])
        return ET.tostring(root, xml_declaration=True, encoding="utf-8")


def _child(root: ET.Element, name: str) -> ET.Element | None:
    return next((c for c in root if c.tag.rsplit("}", 1)[-1] == name), None)


@functools.cache
def _list_element(action: str) -> str | None:
    """The XML element of the list an EC2 listing answers with (``reservationSet``, ...)."""
    import botocore.session

    shape = botocore.session.get_session().get_service_model("ec2").operation_model(action)
    for name, member in shape.output_shape.members.items():
        if member.type_name == "list" and name != "NextToken":
            return str(member.serialization.get("name", name))
    return None


# -- the middleware's part ---------------------------------------------------------------


def serve(
    strictness: Strictness, environ: dict[str, Any], start_response: StartResponse, app: Any
) -> Iterable[bytes]:
    """Answer a cloud API request as strictly as the switches say (moto's answer otherwise)."""
    action, params = request_of(environ)
    if params is not None and strictness.consistency_calls:
        unseen = strictness.unseen(params)
        if unseen:
            code, message = NOT_FOUND[unseen[0][: unseen[0].index("-") + 1]]
            body = ec2_error_body(code, message.format(", ".join(unseen)))
            start_response("400 Bad Request", [("Content-Type", "text/xml")])
            return [body]
    listing = _listing(action, environ, params) if strictness.page_size else None
    if listing is not None:
        token = _request_token(environ, params)
        if token is not None and token.startswith(_TOKEN_PREFIX):
            body = strictness.next_page(token) or b""
            start_response("200 OK", [("Content-Type", "text/xml"), *_length(body)])
            return [body]
    records = strictness.consistency_calls and action in CREATED_IDS
    if listing is None and not records:
        return app(environ, start_response)
    status, headers, body = _call(app, environ)
    if status.startswith("200"):
        if records:
            strictness.created(action, body)
        if listing is not None:
            body = strictness.page(body, *listing)
    headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
    start_response(status, [*headers, *_length(body)])
    return [body]


def _listing(
    action: str, environ: dict[str, Any], params: dict[str, str] | None
) -> tuple[str, str] | None:
    """``(list element, token element)`` of a paged listing, or None."""
    if params is not None and action in PAGED:
        element = _list_element(action)
        return (element, "nextToken") if element else None
    if action == "s3:GET" and environ.get("PATH_INFO", "") in ("", "/"):
        return ("Buckets", "ContinuationToken")  # ListBuckets
    return None


def _request_token(environ: dict[str, Any], params: dict[str, str] | None) -> str | None:
    if params is not None:
        return params.get("NextToken")
    query = parse_qs(environ.get("QUERY_STRING", ""))
    return query.get("continuation-token", [None])[0]


def _call(app: Any, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
    answer: dict[str, Any] = {}

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        answer["status"], answer["headers"] = status, headers
        return io.BytesIO().write

    chunks = app(environ, start)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return answer["status"], list(answer["headers"]), body


def _length(body: bytes) -> list[tuple[str, str]]:
    return [("Content-Length", str(len(body)))]


# -- the switches --------------------------------------------------------------------------


def remove_default_vpc(account_id: str, region: str) -> str | None:
    """Make the region's default VPC an ordinary one (its subnets no longer default for
    their zones): the account has no default VPC, as after ``aws ec2 delete-vpc`` of it and
    the creation of one of the user's own. Returns that VPC's id (None if there was none)."""
    from moto.ec2.models import ec2_backends

    backend = ec2_backends[account_id][region]
    for vpc in list(backend.vpcs.values()):
        if vpc.is_default:
            vpc.is_default = False
            for subnet in backend.describe_subnets(filters={"vpc-id": [vpc.id]}):
                subnet.default_for_az = False
            return str(vpc.id)
    return None


class LocalStrictness:
    """The strictness switches of a :class:`~dask_rawvm.localcloud.LocalCloud` (see the
    module's table); each can be turned on at any time, also while a cluster runs."""

    account_id: str
    region: str
    faults: FaultInjector
    capacity: CapacityModel
    strictness: Strictness
    imds_tokens: imds.Tokens
    quotas: quotas.Quotas

    def eventual_consistency(self, calls: int = 2) -> None:
        """Each instance, security group and launch template made from now on is
        ``...NotFound`` for the next ``calls`` calls that name it (0: off)."""
        self.strictness.consistency_calls = max(int(calls), 0)

    def paginate(self, page_size: int | None = 2) -> None:
        """Answer EC2 listings and S3's ListBuckets ``page_size`` items at a time (None: off)."""
        self.strictness.page_size = page_size

    def imds_token_ttl(self, seconds: float | None) -> None:
        """IMDSv2 tokens issued from now on expire after at most ``seconds`` (None: the
        TTL asked for, at most 6 h, as on EC2)."""
        self.imds_tokens.max_ttl = seconds

    def refuse_metadata_tag_keys(self, refuse: bool = True) -> None:
        """Refuse launches with ``InstanceMetadataTags`` enabled whose tag keys EC2 refuses."""
        self.capacity.rules.metadata_tag_keys = refuse

    def refuse_spot_service_linked_role(self, refuse: bool = True) -> None:
        """Refuse every spot launch as EC2 does for an account without the spot
        service-linked role and credentials that may not create it."""
        self.capacity.rules.spot_refusal = SPOT_ROLE_REFUSAL if refuse else None

    def iam_propagation(self, seconds: float) -> None:
        """Launches refuse an instance profile made less than ``seconds`` ago as EC2 refuses
        one it does not know (``InvalidParameterValue``), as before IAM's change reached it."""
        self.capacity.rules.profile_propagation = max(float(seconds), 0.0)

    def deny(self, action: str, denied: bool = True) -> None:
        """Answer every call of ``action`` with ``UnauthorizedOperation`` (HTTP 403)."""
        self.faults.deny(action, denied)

    def remove_default_vpc(self) -> str | None:
        """No default VPC in this cloud's region; returns the id of the VPC that was it."""
        return remove_default_vpc(self.account_id, self.region)

    def set_quota(self, quota_code: str, vcpus: float | None) -> None:
        """Apply ``vcpus`` to one of EC2's vCPU quotas (:data:`.quotas.EC2_VCPU_QUOTAS`);
        None: no applied value (callers fall back to AWS's default)."""
        self.quotas.set(quota_code, vcpus)

    def enforce_iam(self) -> None:
        """Check every request against its caller's IAM policies, **in this whole process**
        (moto's switch is global): run such a cloud as ``dask-rawvm localcloud``."""
        iam.enforce()

    def create_identity(self, name: str, policy: dict[str, Any]) -> dict[str, str]:
        """An IAM user of this cloud holding exactly ``policy``; its access key
        (``aws_access_key_id``, ``aws_secret_access_key``)."""
        return iam.create_identity(self.account_id, name, policy)

    def strict(
        self, consistency_calls: int = 2, imds_token_ttl: float = 5.0, page_size: int = 2
    ) -> str | None:
        """Everything EC2 does that moto does not, at once: eventual consistency, expiring
        IMDS tokens, refused metadata tag keys, no default VPC, no spot service-linked role,
        GetConsoleOutput denied, paged listings, instance profiles unknown to EC2 for 5 s.
        Returns the id of the VPC that was the default (pass it as ``vpc=``). IAM is not
        enforced (see :meth:`enforce_iam`)."""
        self.eventual_consistency(consistency_calls)
        self.iam_propagation(5.0)
        self.imds_token_ttl(imds_token_ttl)
        self.refuse_metadata_tag_keys()
        self.refuse_spot_service_linked_role()
        self.deny("GetConsoleOutput")
        self.paginate(page_size)
        return self.remove_default_vpc()


#: Control verbs (``/_localcloud/<verb>``) and the method each one calls.
VERBS = {
    "eventual-consistency": "eventual_consistency",
    "paginate": "paginate",
    "imds-token-ttl": "imds_token_ttl",
    "refuse-metadata-tag-keys": "refuse_metadata_tag_keys",
    "refuse-spot-service-linked-role": "refuse_spot_service_linked_role",
    "iam-propagation": "iam_propagation",
    "deny": "deny",
    "remove-default-vpc": "remove_default_vpc",
    "set-quota": "set_quota",
    "enforce-iam": "enforce_iam",
    "create-identity": "create_identity",
    "strict": "strict",
}


def control(cloud: LocalStrictness, verb: str, args: dict[str, Any]) -> tuple[bool, Any]:
    """Run a strictness verb of the control API: ``(handled, result)``."""
    method = VERBS.get(verb)
    if method is None:
        return False, None
    return True, {"result": getattr(cloud, method)(**args)}


class RemoteStrictness:
    """The strictness switches of a :class:`~dask_rawvm.localcloud.RemoteCloud`, over the
    control API (see :class:`LocalStrictness` for each)."""

    def _call(self, verb: str, **args: Any) -> Any:
        raise NotImplementedError

    def _switch(self, verb: str, **args: Any) -> Any:
        return self._call(verb, **args)["result"]

    def eventual_consistency(self, calls: int = 2) -> None:
        self._switch("eventual-consistency", calls=calls)

    def paginate(self, page_size: int | None = 2) -> None:
        self._switch("paginate", page_size=page_size)

    def imds_token_ttl(self, seconds: float | None) -> None:
        self._switch("imds-token-ttl", seconds=seconds)

    def refuse_metadata_tag_keys(self, refuse: bool = True) -> None:
        self._switch("refuse-metadata-tag-keys", refuse=refuse)

    def refuse_spot_service_linked_role(self, refuse: bool = True) -> None:
        self._switch("refuse-spot-service-linked-role", refuse=refuse)

    def iam_propagation(self, seconds: float) -> None:
        self._switch("iam-propagation", seconds=seconds)

    def deny(self, action: str, denied: bool = True) -> None:
        self._switch("deny", action=action, denied=denied)

    def remove_default_vpc(self) -> str | None:
        return self._switch("remove-default-vpc")

    def set_quota(self, quota_code: str, vcpus: float | None) -> None:
        self._switch("set-quota", quota_code=quota_code, vcpus=vcpus)

    def enforce_iam(self) -> None:
        self._switch("enforce-iam")

    def create_identity(self, name: str, policy: dict[str, Any]) -> dict[str, str]:
        return dict(self._switch("create-identity", name=name, policy=policy))

    def strict(
        self, consistency_calls: int = 2, imds_token_ttl: float = 5.0, page_size: int = 2
    ) -> str | None:
        return self._switch(
            "strict",
            consistency_calls=consistency_calls,
            imds_token_ttl=imds_token_ttl,
            page_size=page_size,
        )
