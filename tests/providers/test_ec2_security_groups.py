"""EC2's half of secure-by-default: a security group per cluster that admits the client only,
and the client's public address it opens to; against the local cloud over HTTP."""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError

from dask_rawvm.errors import ProviderError
from dask_rawvm.localcloud.server import LocalCloud
from dask_rawvm.providers.base import CLUSTER_TAG
from dask_rawvm.providers.ec2.network import default_vpc_id
from dask_rawvm.providers.ec2.security_groups import (
    PublicAddressError,
    check_cidrs,
    client_cidr,
    cluster_security_groups,
    create_cluster_security_group,
    delete_cluster_security_group,
    ingress_cidrs,
)


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as cloud:
        yield cloud


@pytest.fixture
async def ec2(cloud: LocalCloud) -> AsyncIterator[Any]:
    async with get_session().create_client("ec2", **cloud.client_kwargs()) as client:
        yield client


# -- the security group -----------------------------------------------------------------------


def rules(group: dict[str, Any]) -> set[tuple[Any, ...]]:
    """A group's ingress as (protocol, from, to, source) tuples."""
    found = set()
    for p in group["IpPermissions"]:
        key = (p["IpProtocol"], p.get("FromPort"), p.get("ToPort"))
        found |= {(*key, r["CidrIp"]) for r in p.get("IpRanges", [])}
        found |= {(*key, r["CidrIpv6"]) for r in p.get("Ipv6Ranges", [])}
        found |= {(*key, r["GroupId"]) for r in p.get("UserIdGroupPairs", [])}
    return found


async def describe_group(ec2: Any, group_id: str) -> dict[str, Any]:
    response = await ec2.describe_security_groups(GroupIds=[group_id])
    return response["SecurityGroups"][0]


async def test_security_group_has_exactly_the_expected_rules(ec2: Any) -> None:
    vpc = await default_vpc_id(ec2)
    group_id = await create_cluster_security_group(ec2, "sg-cluster", vpc, ["203.0.113.7/32"])
    group = await describe_group(ec2, group_id)
    assert group["VpcId"] == vpc
    assert {"Key": CLUSTER_TAG, "Value": "sg-cluster"} in group["Tags"]
    assert rules(group) == {
        ("tcp", 8786, 8786, "203.0.113.7/32"),
        ("tcp", 8787, 8787, "203.0.113.7/32"),
        ("-1", None, None, group_id),
    }
    assert await cluster_security_groups(ec2, "sg-cluster") == [group_id]

    await delete_cluster_security_group(ec2, group_id)
    with pytest.raises(ClientError, match=r"InvalidGroup\.NotFound"):
        await describe_group(ec2, group_id)
    assert await cluster_security_groups(ec2, "sg-cluster") == []
    await delete_cluster_security_group(ec2, group_id)  # already gone: fine


async def test_ipv6_and_bare_addresses(ec2: Any) -> None:
    vpc = await default_vpc_id(ec2)
    group_id = await create_cluster_security_group(
        ec2, "sg-v6", vpc, ["198.51.100.1", "2001:db8::1/128"], ports=[8786]
    )
    try:
        assert rules(await describe_group(ec2, group_id)) == {
            ("tcp", 8786, 8786, "198.51.100.1/32"),
            ("tcp", 8786, 8786, "2001:db8::1/128"),
            ("-1", None, None, group_id),
        }
    finally:
        await delete_cluster_security_group(ec2, group_id)


async def test_leftover_group_of_the_same_cluster_is_adopted_and_reset(ec2: Any) -> None:
    vpc = await default_vpc_id(ec2)
    first = await create_cluster_security_group(ec2, "sg-again", vpc, ["192.0.2.1/32"])
    second = await create_cluster_security_group(ec2, "sg-again", vpc, ["192.0.2.2/32"])
    try:
        assert second == first
        assert rules(await describe_group(ec2, second)) == {
            ("tcp", 8786, 8786, "192.0.2.2/32"),
            ("tcp", 8787, 8787, "192.0.2.2/32"),
            ("-1", None, None, second),
        }
    finally:
        await delete_cluster_security_group(ec2, first)


async def test_foreign_group_with_our_name_is_not_adopted(ec2: Any) -> None:
    vpc = await default_vpc_id(ec2)
    response = await ec2.create_security_group(
        GroupName="dask-rawvm-sg-taken", Description="someone else's", VpcId=vpc
    )
    try:
        with pytest.raises(ProviderError, match="not tagged"):
            await create_cluster_security_group(ec2, "sg-taken", vpc, ["192.0.2.1/32"])
    finally:
        await ec2.delete_security_group(GroupId=response["GroupId"])


async def test_delete_waits_while_instances_hold_the_group(cloud: LocalCloud, ec2: Any) -> None:
    vpc = await default_vpc_id(ec2)
    group_id = await create_cluster_security_group(ec2, "sg-busy", vpc, ["192.0.2.1/32"])
    # moto never refuses for instances; the local cloud answers as EC2 does meanwhile.
    cloud.inject("DeleteSecurityGroup", error="DependencyViolation", count=2)
    cloud.reset_calls()
    await delete_cluster_security_group(ec2, group_id, timeout=30, poll_interval=0.01)
    assert cloud.calls["DeleteSecurityGroup"] == 3
    assert await cluster_security_groups(ec2, "sg-busy") == []


async def test_delete_gives_up_at_the_timeout(cloud: LocalCloud, ec2: Any) -> None:
    vpc = await default_vpc_id(ec2)
    group_id = await create_cluster_security_group(ec2, "sg-stuck", vpc, ["192.0.2.1/32"])
    cloud.inject("DeleteSecurityGroup", error="DependencyViolation", count=1000)
    try:
        with pytest.raises(ProviderError, match="still in use"):
            await delete_cluster_security_group(ec2, group_id, timeout=0.2, poll_interval=0.05)
    finally:
        cloud.clear_faults()
    await delete_cluster_security_group(ec2, group_id)


def test_open_to_all_only_when_asked_and_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="dask_rawvm.providers.ec2.security_groups"):
        assert check_cidrs(["10.1.2.3/32"]) == ["10.1.2.3/32"]
        assert not caplog.records
        assert check_cidrs(["0.0.0.0/0"]) == ["0.0.0.0/0"]
    assert "whole internet" in caplog.text
    with pytest.raises(ValueError, match="not a CIDR"):
        check_cidrs(["my-laptop"])


# -- the client's public address ---------------------------------------------------------------


class WhatIsMyIP:
    """A local stand-in for checkip.amazonaws.com: answers ``body`` and counts requests."""

    def __init__(self, body: bytes) -> None:
        outer = self
        self.hits = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.hits += 1
                self.send_response(200)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def services() -> Iterator[dict[str, Any]]:
    good, garbage = WhatIsMyIP(b"203.0.113.7\n"), WhatIsMyIP(b"<html>hello</html>")
    with socket.socket() as s:  # a port nobody listens on: refused at once
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}/"
    yield {"good": good, "garbage": garbage, "dead": dead}
    good.close()
    garbage.close()


async def test_client_cidr_asks_the_services(services: dict[str, Any]) -> None:
    urls = [services["dead"], services["garbage"].url, services["good"].url]
    assert await client_cidr("https://ec2.us-east-1.amazonaws.com", urls) == "203.0.113.7/32"


async def test_client_cidr_on_loopback_makes_no_call(
    cloud: LocalCloud, services: dict[str, Any]
) -> None:
    assert await client_cidr(cloud.endpoint_url, [services["good"].url]) == "127.0.0.0/8"
    assert await client_cidr("http://localhost:5000", [services["good"].url]) == "127.0.0.0/8"
    assert services["good"].hits == 0


async def test_client_cidr_without_answer_says_what_to_pass(services: dict[str, Any]) -> None:
    with pytest.raises(PublicAddressError, match=r'allow_ingress_from=\["x\.x\.x\.x/32"\]'):
        await client_cidr(None, [services["dead"], services["garbage"].url], timeout=2)


async def test_ingress_cidrs_prefers_the_users_choice(services: dict[str, Any]) -> None:
    assert await ingress_cidrs(["10.9.8.7"], None, [services["good"].url]) == ["10.9.8.7/32"]
    assert services["good"].hits == 0
    assert await ingress_cidrs(None, None, [services["good"].url]) == ["203.0.113.7/32"]
