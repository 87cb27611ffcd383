"""Security by default: per-cluster mutual TLS, secrets via expiring URLs, one security group.

Everything runs against the embedded local cloud over HTTP (EC2 and S3) and real
Dask schedulers and workers, in-process or as ``dask`` subprocesses.
"""

from __future__ import annotations

import asyncio
import datetime
import http.server
import ipaddress
import logging
import os
import re
import socket
import ssl
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from distributed import Client, Scheduler, Worker
from distributed.comm import connect
from distributed.comm.core import CommClosedError
from distributed.security import Security

from dask_rawvm.localcloud.server import LocalCloud
from dask_rawvm.providers.base import CLUSTER_TAG, ProviderError
from dask_rawvm.security import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    S3_CONFIG,
    ClusterTLS,
    PublicAddressError,
    check_cidrs,
    client_cidr,
    cluster_security_groups,
    create_cluster_security_group,
    default_vpc_id,
    delete_cluster_material,
    delete_cluster_security_group,
    delete_vm_material,
    ingress_cidrs,
    material_key,
    security_from_material,
    unpack_vm_material,
    upload_vm_material,
    vm_tls_script,
)

BUCKET = "dask-rawvm-secrets"


@pytest.fixture(scope="module")
def cloud() -> Iterator[LocalCloud]:
    with LocalCloud() as cloud:
        yield cloud


@pytest.fixture
async def ec2(cloud: LocalCloud) -> AsyncIterator[Any]:
    async with get_session().create_client("ec2", **cloud.client_kwargs()) as client:
        yield client


@pytest.fixture
async def s3(cloud: LocalCloud) -> AsyncIterator[Any]:
    async with get_session().create_client(
        "s3", config=S3_CONFIG, **cloud.client_kwargs()
    ) as client:
        try:
            await client.create_bucket(Bucket=BUCKET)
        except ClientError as e:  # the module's cloud keeps the bucket between tests
            if "BucketAlreadyOwnedByYou" not in str(e):
                raise
        yield client


@pytest.fixture(scope="module")
def tls() -> ClusterTLS:
    return ClusterTLS.create("test-cluster")


# -- certificates ---------------------------------------------------------------------------


def test_ca_is_short_lived_p256_and_signs_leaves(tls: ClusterTLS) -> None:
    ca = x509.load_pem_x509_certificate(tls.ca_cert_pem.encode())
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    lifetime = ca.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc)
    assert datetime.timedelta(days=6) < lifetime <= datetime.timedelta(days=7)

    cert_pem, key_pem = tls.issue("scheduler", ["10.0.0.5", "scheduler.example"])
    cert = x509.load_pem_x509_certificate(cert_pem.encode())
    cert.verify_directly_issued_by(ca)
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.5")]
    assert san.get_values_for_type(x509.DNSName) == ["scheduler.example"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert "PRIVATE KEY" in key_pem
    assert cert.not_valid_after_utc == ca.not_valid_after_utc


def test_material_never_holds_the_ca_key(tls: ClusterTLS) -> None:
    material = tls.vm_material("worker")
    assert set(material) == {CA_FILE, CERT_FILE, KEY_FILE}
    assert material[CA_FILE] == tls.ca_cert_pem
    assert "PRIVATE KEY" not in material[CA_FILE] + material[CERT_FILE]
    assert "_ca_key" not in repr(tls)
    with pytest.raises(ValueError, match="role"):
        tls.vm_material("client")


def test_client_security_is_in_memory_and_requires_encryption(tls: ClusterTLS) -> None:
    security = tls.client_security()
    assert security.require_encryption
    assert "BEGIN CERTIFICATE" in security.get_tls_config_for_role("client")["cert"]
    assert "In-memory" in repr(security) and "PRIVATE" not in repr(security)


# -- mutual TLS between real Dask processes -------------------------------------------------


@asynccontextmanager
async def tls_cluster(tls: ClusterTLS) -> AsyncIterator[Scheduler]:
    """A scheduler and one worker, each with its own VM bundle."""
    scheduler_security = security_from_material(tls.vm_material("scheduler"))
    worker_security = security_from_material(tls.vm_material("worker"))
    async with (
        Scheduler(
            host="127.0.0.1", port=0, dashboard_address=":0", security=scheduler_security
        ) as scheduler,
        Worker(scheduler.address, security=worker_security, nthreads=1),
    ):
        yield scheduler


async def test_scheduler_and_worker_talk_mutual_tls(tls: ClusterTLS) -> None:
    async with tls_cluster(tls) as scheduler:
        assert scheduler.address.startswith("tls://127.0.0.1:")
        assert len(scheduler.workers) == 1
        assert all(w.startswith("tls://") for w in scheduler.workers)
        async with Client(
            scheduler.address, security=tls.client_security(), asynchronous=True
        ) as client:
            assert await client.submit(sum, [1, 2, 3]) == 6


async def test_plain_tcp_is_refused(tls: ClusterTLS) -> None:
    async with tls_cluster(tls) as scheduler:
        plain = scheduler.address.replace("tls://", "tcp://")
        with pytest.raises(CommClosedError):  # dropped during Dask's handshake
            await connect(plain, timeout=5)


async def test_client_of_another_cluster_is_refused(tls: ClusterTLS) -> None:
    other = ClusterTLS.create("other-cluster")
    async with tls_cluster(tls) as scheduler:
        # Its own CA rejects the scheduler...
        with pytest.raises(OSError):
            await Client(
                scheduler.address,
                security=other.client_security(),
                asynchronous=True,
                timeout=5,
            )
        # ...and the scheduler rejects its certificate even when it trusts our CA.
        cert, key = other.issue("client")
        trusting = Security(
            require_encryption=True,
            tls_ca_file=tls.ca_cert_pem,
            tls_client_cert=cert,
            tls_client_key=key,
        )
        with pytest.raises(CommClosedError, match="unknown ca"):
            await connect(scheduler.address, timeout=5, **trusting.get_connection_args("client"))


async def test_client_without_a_certificate_is_refused(tls: ClusterTLS) -> None:
    async with tls_cluster(tls) as scheduler:
        context = ssl.create_default_context(cadata=tls.ca_cert_pem)
        context.check_hostname = False
        with pytest.raises(CommClosedError, match="certificate required"):
            await connect(
                scheduler.address, timeout=5, ssl_context=context, require_encryption=True
            )


# -- shipping material: S3 object + presigned URL + the VM's shell lines ----------------------


async def test_presigned_round_trip_tagged_and_deleted(s3: Any, tls: ClusterTLS) -> None:
    material = tls.vm_material("worker")
    key = material_key("test-cluster", "worker")
    url = await upload_vm_material(s3, BUCKET, key, material, 3600, cluster="test-cluster")
    assert "X-Amz-Expires=3600" in url and "X-Amz-Signature=" in url
    assert "PRIVATE" not in url

    body = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read())
    assert unpack_vm_material(body) == material
    tags = (await s3.get_object_tagging(Bucket=BUCKET, Key=key))["TagSet"]
    assert {"Key": CLUSTER_TAG, "Value": "test-cluster"} in tags

    await delete_vm_material(s3, BUCKET, key)
    with pytest.raises(urllib.error.HTTPError, match="404"):
        await asyncio.to_thread(urllib.request.urlopen, url, None, 10)


async def test_sigv2_client_is_refused(cloud: LocalCloud, s3: Any, tls: ClusterTLS) -> None:
    key = material_key("test-cluster", "worker")
    async with get_session().create_client("s3", **cloud.client_kwargs()) as default_s3:
        with pytest.raises(ValueError, match="s3v4"):
            await upload_vm_material(
                default_s3, BUCKET, key, tls.vm_material("worker"), cluster="test-cluster"
            )
    listed = await s3.list_objects_v2(Bucket=BUCKET, Prefix=key)
    assert listed.get("KeyCount", 0) == 0  # nothing left behind


async def test_delete_cluster_material(s3: Any, tls: ClusterTLS) -> None:
    for role in ("scheduler", "worker", "worker"):
        key = material_key("gone-cluster", role)
        await upload_vm_material(s3, BUCKET, key, tls.vm_material(role), cluster="gone-cluster")
    await upload_vm_material(
        s3,
        BUCKET,
        material_key("kept-cluster", "worker"),
        tls.vm_material("worker"),
        cluster="kept-cluster",
    )
    assert await delete_cluster_material(s3, BUCKET, "gone-cluster") == 3
    assert (await s3.list_objects_v2(Bucket=BUCKET, Prefix="dask-rawvm/gone-cluster/")).get(
        "KeyCount"
    ) == 0
    assert (await s3.list_objects_v2(Bucket=BUCKET, Prefix="dask-rawvm/kept-cluster/")).get(
        "KeyCount"
    ) == 1


def test_user_data_snippet_is_small_and_secret_free() -> None:
    script = vm_tls_script("poweroff_vm 1")
    assert len(script.encode()) < 2048
    assert "PRIVATE KEY" not in script and "BEGIN" not in script
    assert "poweroff_vm 1" in script
    assert "DASHBOARD__TLS" not in script
    assert "DASHBOARD__TLS__CERT" in vm_tls_script(dashboard_tls=True)


async def run_sh(script: str, env: dict[str, str]) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        "sh",
        "-c",
        script,
        env={"PATH": os.environ["PATH"], **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_snippet_fetches_into_private_dir_and_configures_dask(
    s3: Any, tls: ClusterTLS, tmp_path: Any
) -> None:
    material = tls.vm_material("worker")
    key = material_key("test-cluster", "worker")
    url = await upload_vm_material(s3, BUCKET, key, material, cluster="test-cluster")
    check = 'stat -c "%a %n" "$RAWVM_TLS_DIR" "$RAWVM_TLS_DIR"/*; env'
    code, out, err = await run_sh(
        f"set -u\n{vm_tls_script()}\n{check}",
        {"RAWVM_SECRETS_URL": url, "TMPDIR": str(tmp_path)},
    )
    assert code == 0, err
    modes = dict(line.split(" ", 1)[::-1] for line in out.splitlines() if line[:1].isdigit())
    tls_dir = next(path for path, mode in modes.items() if mode == "700")
    assert tls_dir.startswith(str(tmp_path))
    assert {os.path.basename(p): m for p, m in modes.items() if p != tls_dir} == {
        CA_FILE: "600",
        CERT_FILE: "600",
        KEY_FILE: "600",
    }
    with open(os.path.join(tls_dir, KEY_FILE)) as f:
        assert f.read() == material[KEY_FILE]
    env = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert "RAWVM_SECRETS_URL" not in env
    assert env["DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION"] == "True"
    assert env["DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME"] == "tls"
    assert env["DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY"] == f"{tls_dir}/{KEY_FILE}"


@pytest.mark.parametrize("url", ["", "missing"])
async def test_snippet_fails_without_material(
    cloud: LocalCloud, s3: Any, url: str, tmp_path: Any
) -> None:
    if url:
        url = await s3.generate_presigned_url(
            "get_object", Params={"Bucket": BUCKET, "Key": "dask-rawvm/nothing-here.tar"}
        )
    env = {"TMPDIR": str(tmp_path), **({"RAWVM_SECRETS_URL": url} if url else {})}
    code, out, err = await run_sh(f"set -u\n{vm_tls_script('exit 7')}\necho reached", env)
    assert code == 7
    assert "could not fetch TLS material" in err
    assert "reached" not in out


class DaskProcess:
    """A ``dask scheduler``/``dask worker`` run after the snippet, as on a VM."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []

    @classmethod
    async def start(
        cls, url: str, tmp_path: Any, module: str, *args: str, dashboard_tls: bool = False
    ) -> DaskProcess:
        snippet = vm_tls_script(dashboard_tls=dashboard_tls)
        script = f'set -u\n{snippet}\nexec "$0" -m {module} "$@"'
        env = {**os.environ, "RAWVM_SECRETS_URL": url, "TMPDIR": str(tmp_path)}
        env = {k: v for k, v in env.items() if not k.startswith("DASK_")}
        process = await asyncio.create_subprocess_exec(
            "sh",
            "-c",
            script,
            sys.executable,
            *args,
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        return cls(process)

    async def wait_for(self, pattern: str) -> re.Match[str]:
        """Read the log until a line matches."""
        assert self.process.stderr is not None
        while True:
            line = (await asyncio.wait_for(self.process.stderr.readline(), 60)).decode()
            self.lines.append(line)
            assert line, "".join(self.lines)
            match = re.search(pattern, line)
            if match:
                return match

    def drain(self) -> None:
        """Keep reading the log in the background, so a full pipe never blocks the process."""
        assert self.process.stderr is not None
        self._drain = asyncio.ensure_future(self.process.stderr.read())

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.terminate()
        await self.process.wait()


async def test_dask_cli_scheduler_and_worker_use_the_bundle(
    s3: Any, tls: ClusterTLS, tmp_path: Any
) -> None:
    urls = {}
    for role in ("scheduler", "worker"):
        key = material_key("test-cluster", role)
        material = tls.vm_material(role, hosts=["127.0.0.1"])
        urls[role] = await upload_vm_material(s3, BUCKET, key, material, cluster="test-cluster")
    scheduler = await DaskProcess.start(
        urls["scheduler"],
        tmp_path,
        "distributed.cli.dask_scheduler",
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        "--dashboard-address",
        "127.0.0.1:0",
        dashboard_tls=True,
    )
    worker = None
    try:
        address = (await scheduler.wait_for(r"Scheduler at:\s+(\S+)"))[1]
        assert address.startswith("tls://127.0.0.1:")  # DEFAULT_SCHEME=tls, no --protocol
        dashboard = (await scheduler.wait_for(r"dashboard at:\s+(\S+)/status"))[1]
        scheduler.drain()
        assert dashboard.startswith("https://127.0.0.1:")
        # Verified against the cluster's CA, hostname included (the SAN given above).
        context = ssl.create_default_context(cadata=tls.ca_cert_pem)
        health = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"{dashboard}/health", context=context).read()
        )
        assert health == b"ok"
        worker = await DaskProcess.start(
            urls["worker"],
            tmp_path,
            "distributed.cli.dask_worker",
            address,
            "--host",
            "127.0.0.1",
            "--nthreads",
            "1",
            "--no-dashboard",
        )
        worker.drain()
        async with Client(address, security=tls.client_security(), asynchronous=True) as client:
            await client.wait_for_workers(1, timeout=60)
            info = await client.scheduler.identity()
            assert [w.split(":")[0] for w in info["workers"]] == ["tls"]
            assert await client.submit(pow, 2, 10) == 1024
    finally:
        for process in (worker, scheduler):
            if process is not None:
                await process.stop()


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
    with caplog.at_level(logging.WARNING, logger="dask_rawvm.security"):
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
