"""Network security by default: per-cluster TLS, secrets kept out of user-data, one firewall.

Three things, each closed by default:

- **TLS everywhere.** :class:`ClusterTLS` makes a certificate authority for one
  cluster and issues the scheduler's, the workers' and the client's certificates
  from it. Every Dask connection is mutual TLS: both ends present a certificate
  signed by *this cluster's* CA and refuse anything else, including plain TCP.
- **No secret in user-data.** User-data is readable by anyone allowed
  ``DescribeInstanceAttribute`` and is capped at 16 KiB. A VM's key and
  certificates travel in a small tar object in S3 (:func:`upload_vm_material`);
  user-data carries only :func:`vm_tls_script` and an expiring presigned URL to
  that object.
- **One security group per cluster** (:func:`create_cluster_security_group`):
  the scheduler and dashboard ports open to the client's public address only
  (:func:`ingress_cidrs`), every port open between members of the group, and
  nothing else. It is deleted with the cluster (:func:`delete_cluster_security_group`).

Hostnames are not checked, by design: Dask's TLS contexts use
``verify_mode=CERT_REQUIRED`` with ``check_hostname=False``
(:meth:`distributed.security.Security._get_tls_context`, "we expect a dedicated
CA for the cluster and people using IP addresses"). A worker's address is not
known before it boots, so its certificate cannot name it; trust comes from the
per-cluster CA alone, which is exactly what a CA per cluster is for.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import ipaddress
import logging
import random
import secrets
import tarfile
import urllib.parse
import urllib.request
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiobotocore.config import AioConfig
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

from dask_rawvm.providers.base import CLUSTER_TAG, ProviderError

logger = logging.getLogger(__name__)

# -- TLS material ---------------------------------------------------------------------------

#: How long a cluster's CA and certificates are valid. Short on purpose: a worker
#: key is shared by every worker VM of a cluster and travels to each of them, so
#: if one leaks it must stop opening the cluster soon; clusters are mostly
#: hours-long. Pass ``validity=`` to :meth:`ClusterTLS.create` for longer ones.
DEFAULT_VALIDITY = datetime.timedelta(days=7)
# Certificates start a little in the past: a VM whose clock lags the client's by
# a few seconds must not reject a certificate as "not yet valid".
CLOCK_SKEW = datetime.timedelta(minutes=5)
#: The roles a VM runs as; a bundle holds the certificate of one of them.
VM_ROLES = ("scheduler", "worker")
#: File names in a VM's bundle (and in its TLS directory after download).
CA_FILE, CERT_FILE, KEY_FILE = "ca.pem", "cert.pem", "key.pem"
_X509_NAME_MAX = 64  # RFC 5280 upper bound for commonName


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "dask-rawvm"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name[:_X509_NAME_MAX]),
        ]
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _subject_alt_names(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


@dataclass(frozen=True)
class ClusterTLS:
    """A certificate authority for one cluster, and the certificates it issues.

    Keys are EC P-256: generated in about a millisecond (RSA-2048 takes tens),
    small certificates, and supported by every OpenSSL Dask runs on.

    Create one with :meth:`create`; the CA key never leaves this object (it is
    not in :meth:`vm_material`, nor in any :class:`~distributed.security.Security`).

    Attributes
    ----------
    cluster
        The cluster's name, in the CA's common name.
    ca_cert_pem
        The CA certificate, PEM: the only certificate any cluster member trusts.
    not_after
        When the CA and everything it issued expire.
    """

    cluster: str
    ca_cert_pem: str
    not_after: datetime.datetime
    _ca_key: ec.EllipticCurvePrivateKey = field(repr=False)
    _ca_cert: x509.Certificate = field(repr=False)

    @classmethod
    def create(
        cls, cluster_name: str, validity: datetime.timedelta = DEFAULT_VALIDITY
    ) -> ClusterTLS:
        """Make a new CA for ``cluster_name``, valid for ``validity`` (7 days by default).

        Parameters
        ----------
        cluster_name
            The cluster's name.
        validity
            Lifetime of the CA and of every certificate it issues.
        """
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        name = _name(f"dask-rawvm CA {cluster_name}")
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + validity)
            # path_length=0: this CA signs leaves only, never another CA.
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cluster_name, _cert_pem(cert), now + validity, key, cert)

    def issue(self, role: str, hosts: Sequence[str] = ()) -> tuple[str, str]:
        """A new key and a certificate for it, signed by this cluster's CA.

        Every certificate is good for both ends of a connection (server and
        client authentication): a Dask scheduler, worker or nanny both listens
        and connects.

        Parameters
        ----------
        role
            ``"scheduler"``, ``"worker"``, ``"client"`` (any name: it goes in the
            common name, for the logs).
        hosts
            IP addresses and DNS names for the subject alternative names. Dask does
            not check them; they help other tools (``openssl s_client``, browsers).

        Returns
        -------
        cert_pem, key_pem
            The certificate and its unencrypted PKCS#8 private key, PEM.
        """
        if not role:
            raise ValueError("a certificate needs a role")
        key = ec.generate_private_key(ec.SECP256R1())
        ca_ski = self._ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(f"{role}.{self.cluster}"))
            .issuer_name(self._ca_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - CLOCK_SKEW)
            .not_valid_after(self.not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski.value),
                critical=False,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
        )
        names = _subject_alt_names(hosts)
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._ca_key, hashes.SHA256())
        return _cert_pem(cert), _key_pem(key)

    def client_security(self) -> Security:
        """The :class:`~distributed.security.Security` for the user's process.

        Certificates are held in memory: distributed accepts PEM contents in place
        of file paths (it tells them apart by the newline), so nothing is written
        here. Encryption is required, so the client refuses ``tcp://`` too.
        """
        cert, key = self.issue("client")
        return Security(
            require_encryption=True,
            tls_ca_file=self.ca_cert_pem,
            tls_client_cert=cert,
            tls_client_key=key,
        )

    def vm_material(self, role: str, hosts: Sequence[str] = ()) -> dict[str, str]:
        """The files a scheduler or worker VM needs, by file name, for its bundle.

        For :func:`upload_vm_material`, never for user-data: it holds a private key.
        One bundle serves every VM of a launch call (their addresses are unknown
        until they boot; Dask does not check them).

        Parameters
        ----------
        role
            ``"scheduler"`` or ``"worker"``.
        hosts
            Subject alternative names, if known (see :meth:`issue`).
        """
        if role not in VM_ROLES:
            raise ValueError(f"role must be one of {VM_ROLES}, not {role!r}")
        cert, key = self.issue(role, hosts)
        return {CA_FILE: self.ca_cert_pem, CERT_FILE: cert, KEY_FILE: key}


def _key_usage(ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def security_from_material(material: dict[str, str]) -> Security:
    """A :class:`~distributed.security.Security` for a process holding a VM bundle.

    The same certificate serves the scheduler, worker and client roles, as on a
    VM (see :func:`vm_tls_script`): one Dask process there may act as any of them
    (a worker's tasks open clients with ``get_client``). For in-process schedulers
    and workers, and tests.

    Parameters
    ----------
    material
        A dict from :meth:`ClusterTLS.vm_material`.
    """
    cert, key = material[CERT_FILE], material[KEY_FILE]
    return Security(
        require_encryption=True,
        tls_ca_file=material[CA_FILE],
        **{
            f"tls_{role}_{part}": pem
            for role in ("scheduler", "worker", "client")
            for part, pem in (("cert", cert), ("key", key))
        },
    )


# -- shipping the material to a VM ------------------------------------------------------------

#: How long a presigned URL to a bundle stays valid: enough for a VM to boot and
#: fetch it, short enough that the URL in user-data soon opens nothing.
DEFAULT_URL_EXPIRY = 3600

_TLS_SCRIPT = r"""
# TLS material: fetched from an expiring URL into a private directory, never in user-data.
RAWVM_TLS_DIR=$(umask 077 && mktemp -d "${TMPDIR:-/tmp}/dask-rawvm-tls.XXXXXX") \
  && [ -n "${RAWVM_SECRETS_URL:-}" ] \
  && (umask 077 && curl -sSf --retry 5 --retry-connrefused --max-time 60 \
        -o "$RAWVM_TLS_DIR/bundle.tar" "$RAWVM_SECRETS_URL") \
  && (umask 077 && tar -xf "$RAWVM_TLS_DIR/bundle.tar" -C "$RAWVM_TLS_DIR") \
  && rm -f "$RAWVM_TLS_DIR/bundle.tar" \
  && [ -s "$RAWVM_TLS_DIR/key.pem" ] && [ -s "$RAWVM_TLS_DIR/cert.pem" ] \
  && [ -s "$RAWVM_TLS_DIR/ca.pem" ] \
  || { echo "dask-rawvm: could not fetch TLS material" >&2; @ON_FAILURE@; }
unset RAWVM_SECRETS_URL
export RAWVM_TLS_DIR RAWVM_DASK_SCHEME=tls
export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True
export DASK_DISTRIBUTED__COMM__DEFAULT_SCHEME=tls
export DASK_DISTRIBUTED__COMM__TLS__CA_FILE="$RAWVM_TLS_DIR/ca.pem"
export DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__CERT="$RAWVM_TLS_DIR/cert.pem"
export DASK_DISTRIBUTED__COMM__TLS__SCHEDULER__KEY="$RAWVM_TLS_DIR/key.pem"
export DASK_DISTRIBUTED__COMM__TLS__WORKER__CERT="$RAWVM_TLS_DIR/cert.pem"
export DASK_DISTRIBUTED__COMM__TLS__WORKER__KEY="$RAWVM_TLS_DIR/key.pem"
export DASK_DISTRIBUTED__COMM__TLS__CLIENT__CERT="$RAWVM_TLS_DIR/cert.pem"
export DASK_DISTRIBUTED__COMM__TLS__CLIENT__KEY="$RAWVM_TLS_DIR/key.pem"
"""
_DASHBOARD_TLS = r"""
export DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__CERT="$RAWVM_TLS_DIR/cert.pem"
export DASK_DISTRIBUTED__SCHEDULER__DASHBOARD__TLS__KEY="$RAWVM_TLS_DIR/key.pem"
"""


def vm_tls_script(on_failure: str = "exit 1", dashboard_tls: bool = False) -> str:
    """The POSIX shell lines that give a VM its TLS material, for the bootstrap script.

    Reads ``$RAWVM_SECRETS_URL`` (from :func:`upload_vm_material`), downloads the
    bundle with curl into a new 0700 directory (files 0600), removes the URL from
    the environment so the Dask process and its tasks do not inherit it, and
    exports the ``DASK_DISTRIBUTED__COMM__...`` variables that make ``dask
    scheduler`` and ``dask worker`` require mutual TLS with that bundle, the
    ``tls://`` scheme by default (``DEFAULT_SCHEME``), plus ``RAWVM_TLS_DIR`` and
    ``RAWVM_DASK_SCHEME=tls`` for the rest of the script.

    The same certificate is set for the scheduler, worker and client roles: a
    VM runs one Dask process, which may act as more than one of them.

    Parameters
    ----------
    on_failure
        Shell command run when the material cannot be fetched (the bootstrap
        passes its ``poweroff_vm 1``); must not return.
    dashboard_tls
        Serve the dashboard (and workers' HTTP endpoints) over HTTPS with the VM's
        certificate. Off by default: browsers do not know the cluster's CA and
        warn, and the client must then link ``https://`` (distributed picks the
        scheme from its *local* ``distributed.scheduler.dashboard.tls.cert``).
        Either way the dashboard port is open to ``allow_ingress_from`` only.
    """
    script = _TLS_SCRIPT.replace("@ON_FAILURE@", on_failure)
    return script + _DASHBOARD_TLS if dashboard_tls else script


def pack_vm_material(material: dict[str, str]) -> bytes:
    """A tar archive of ``material`` (file name -> text), every member mode 0600.

    Tar because every VM image can unpack one with no Python; fixed mtime and
    owner so the same material packs to the same bytes.
    """
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, text in sorted(material.items()):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o600, 0
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def unpack_vm_material(data: bytes) -> dict[str, str]:
    """The inverse of :func:`pack_vm_material`."""
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        material = {}
        for member in tar.getmembers():
            extracted = tar.extractfile(member)
            if extracted is not None:
                material[member.name] = extracted.read().decode()
    return material


def material_key(cluster: str, role: str, prefix: str = "dask-rawvm") -> str:
    """Where a cluster's bundle for ``role`` lives in the bucket.

    A random suffix per bundle: a key is never reused, so a URL handed out for
    an earlier launch never fetches a later bundle. All of a cluster's bundles
    share the prefix ``f"{prefix}/{cluster}/"`` (see :func:`delete_cluster_material`).
    """
    return f"{prefix}/{cluster}/tls-{role}-{secrets.token_hex(8)}.tar"


async def upload_vm_material(
    s3: Any,
    bucket: str,
    key: str,
    material: dict[str, str],
    expires: int = DEFAULT_URL_EXPIRY,
    *,
    cluster: str,
) -> str:
    """Put a VM bundle in S3 and return a presigned GET URL to it, for ``RAWVM_SECRETS_URL``.

    Parameters
    ----------
    s3
        An aiobotocore S3 client in the bucket's region, created with
        ``config=AioConfig(signature_version="s3v4")`` (:data:`S3_CONFIG`): without
        it botocore may presign with the deprecated signature version 2, which
        newer regions refuse.
    bucket, key
        Where to put it (see :func:`material_key`). The bucket should block
        public access; the URL's signature is what opens the object.
    material
        From :meth:`ClusterTLS.vm_material`.
    expires
        Seconds the URL stays valid.
    cluster
        Value of the object's ``dask-rawvm:cluster`` tag.

    Returns
    -------
    str
        The presigned URL.
    """
    tagging = urllib.parse.urlencode({CLUSTER_TAG: cluster})
    await s3.put_object(
        Bucket=bucket,
        Key=key,
        Body=pack_vm_material(material),
        ContentType="application/x-tar",
        ServerSideEncryption="AES256",
        Tagging=tagging,
    )
    url: str = await s3.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": key}, ExpiresIn=int(expires)
    )
    if "X-Amz-Signature=" not in url:
        await delete_vm_material(s3, bucket, key)
        raise ValueError(
            "the S3 client presigned with signature version 2; create it with "
            "config=dask_rawvm.security.S3_CONFIG (signature_version='s3v4')"
        )
    return url


async def delete_vm_material(s3: Any, bucket: str, key: str) -> None:
    """Delete one bundle (once its VMs booted, or with the cluster); missing is fine."""
    await s3.delete_object(Bucket=bucket, Key=key)


async def delete_cluster_material(
    s3: Any, bucket: str, cluster: str, prefix: str = "dask-rawvm"
) -> int:
    """Delete every bundle of ``cluster`` (cleanup after a crash); return how many."""
    paginator = s3.get_paginator("list_objects_v2")
    deleted = 0
    async for page in paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/{cluster}/"):
        objects = [{"Key": item["Key"]} for item in page.get("Contents", [])]
        if objects:  # at most 1000 per page, as DeleteObjects allows
            await s3.delete_objects(Bucket=bucket, Delete={"Objects": objects, "Quiet": True})
            deleted += len(objects)
    return deleted


#: The config for the S3 client given to :func:`upload_vm_material`: presign with SigV4.
S3_CONFIG = AioConfig(signature_version="s3v4")


# -- who may reach the scheduler ----------------------------------------------------------------

#: "What is my IP" services, asked at once; the first valid answer wins. IPv4-only
#: on purpose: a dual-stack client reaches EC2 public addresses over IPv4, so an
#: IPv6 answer would open the group to an address the client never comes from.
WHAT_IS_MY_IP = (
    "https://checkip.amazonaws.com",  # what AWS itself suggests
    "https://api.ipify.org",
    "https://ipv4.icanhazip.com",
)


class PublicAddressError(RuntimeError):
    """The client's public address could not be found; pass ``allow_ingress_from``."""


def _is_loopback_endpoint(endpoint_url: str | None) -> bool:
    host = urllib.parse.urlsplit(endpoint_url).hostname if endpoint_url else None
    if not host:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _ask(url: str, timeout: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        answer = response.read(64).decode("ascii", "replace").strip()
    return str(ipaddress.ip_address(answer))  # ValueError on anything but an address


async def client_cidr(
    endpoint_url: str | None = None,
    services: Sequence[str] = WHAT_IS_MY_IP,
    timeout: float = 3.0,
) -> str:
    """This machine's public address as a CIDR (``a.b.c.d/32``), for the scheduler's ingress.

    Parameters
    ----------
    endpoint_url
        The cloud's endpoint. On loopback (the local cloud) the answer is
        ``127.0.0.0/8`` with no network call: the local cloud's VMs and the
        client all live there.
    services
        URLs answering with the caller's address as plain text; asked concurrently.
    timeout
        Seconds to wait for each.

    Raises
    ------
    PublicAddressError
        When no service answers with an address; the message says what to pass.
    """
    if _is_loopback_endpoint(endpoint_url):
        return "127.0.0.0/8"
    errors: list[str] = []
    tasks = [asyncio.ensure_future(asyncio.to_thread(_ask, url, timeout)) for url in services]
    try:
        for next_done in asyncio.as_completed(tasks):
            try:
                address = ipaddress.ip_address(await next_done)
            except (OSError, ValueError) as e:  # URLError and timeouts are OSErrors
                errors.append(str(e))
                continue
            return f"{address}/{address.max_prefixlen}"
    finally:
        for task in tasks:
            task.cancel()
    raise PublicAddressError(
        "could not find this machine's public address to open the scheduler to "
        f"(asked {', '.join(services) or 'no service'}: {'; '.join(errors) or 'no answer'}); "
        'pass allow_ingress_from=["x.x.x.x/32"] with the address clients connect from'
    )


def check_cidrs(cidrs: Iterable[str]) -> list[str]:
    """Normalise CIDRs (a bare address becomes /32 or /128); warn about open-to-all ones.

    Raises
    ------
    ValueError
        On anything that is not an IPv4 or IPv6 network.
    """
    if isinstance(cidrs, str):
        cidrs = [cidrs]
    networks = []
    for cidr in cidrs:
        try:
            network = ipaddress.ip_network(cidr.strip(), strict=False)
        except ValueError as e:
            raise ValueError(f"allow_ingress_from: {cidr!r} is not a CIDR ({e})") from None
        if network.prefixlen == 0:
            logger.warning(
                "allow_ingress_from=%s opens the scheduler and dashboard ports to the whole "
                "internet (still TLS with client certificates, but anyone can knock)",
                network,
            )
        networks.append(str(network))
    return list(dict.fromkeys(networks))


async def ingress_cidrs(
    allow_ingress_from: Sequence[str] | None,
    endpoint_url: str | None = None,
    services: Sequence[str] = WHAT_IS_MY_IP,
    timeout: float = 3.0,
) -> list[str]:
    """Who may reach the scheduler and dashboard: the user's choice, else this machine.

    Parameters
    ----------
    allow_ingress_from
        CIDRs given by the user (used as given, after :func:`check_cidrs`), or
        None for :func:`client_cidr`. ``0.0.0.0/0`` is never a default.
    endpoint_url, services, timeout
        For :func:`client_cidr`.
    """
    if allow_ingress_from is not None:
        return check_cidrs(allow_ingress_from)
    return [await client_cidr(endpoint_url, services, timeout)]


# -- the security group -------------------------------------------------------------------------

#: Dask's scheduler and dashboard ports (as in :mod:`dask_rawvm.environment.bootstrap`).
DEFAULT_PORTS = (8786, 8787)


def security_group_name(cluster: str) -> str:
    """The name of a cluster's security group (unique per VPC, like the cluster)."""
    return f"dask-rawvm-{cluster}"


def _error_code(error: ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


def ingress_permissions(
    group_id: str, cidrs: Sequence[str], ports: Sequence[int] = DEFAULT_PORTS
) -> list[dict[str, Any]]:
    """The ``IpPermissions`` of a cluster's group: ``ports`` from ``cidrs``, all from itself."""
    v4 = [{"CidrIp": c} for c in cidrs if ipaddress.ip_network(c).version == 4]
    v6 = [{"CidrIpv6": c} for c in cidrs if ipaddress.ip_network(c).version == 6]
    permissions: list[dict[str, Any]] = []
    if v4 or v6:
        permissions += [
            {
                "IpProtocol": "tcp",
                "FromPort": port,
                "ToPort": port,
                "IpRanges": v4,
                "Ipv6Ranges": v6,
            }
            for port in ports
        ]
    # Workers reach the scheduler and each other (ephemeral worker, nanny and
    # dashboard ports) through membership, whatever their addresses turn out to be.
    permissions.append({"IpProtocol": "-1", "UserIdGroupPairs": [{"GroupId": group_id}]})
    return permissions


async def default_vpc_id(ec2: Any) -> str:
    """The id of the region's default VPC.

    Raises
    ------
    ProviderError
        When the region has none (deleted, or an account created that way).
    """
    response = await ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])
    vpcs = response.get("Vpcs", [])
    if not vpcs:
        raise ProviderError(
            "DescribeVpcs: this region has no default VPC; pass the VPC to launch in"
        )
    return str(vpcs[0]["VpcId"])


async def create_cluster_security_group(
    ec2: Any,
    cluster: str,
    vpc_id: str,
    allow_ingress_from: Sequence[str],
    ports: Sequence[int] = DEFAULT_PORTS,
) -> str:
    """Create the cluster's security group; return its id.

    Ingress: ``ports`` (the scheduler's and the dashboard's) from
    ``allow_ingress_from`` only, and all traffic from members of the group.
    Egress stays EC2's default (all), which VMs need to fetch their environment.
    A group of the same name left by an earlier run of this cluster is adopted
    and its rules reset.

    Parameters
    ----------
    ec2
        An aiobotocore EC2 client.
    cluster
        The cluster's name: the group's name suffix and its ``dask-rawvm:cluster`` tag.
    vpc_id
        The VPC (see :func:`default_vpc_id`).
    allow_ingress_from
        CIDRs (see :func:`ingress_cidrs`); empty admits members only.
    ports
        Ports open to ``allow_ingress_from``.
    """
    cidrs = check_cidrs(allow_ingress_from)
    name = security_group_name(cluster)
    try:
        response = await ec2.create_security_group(
            GroupName=name,
            Description=f"dask-rawvm cluster {cluster}: Dask ports from the client, all within",
            VpcId=vpc_id,
            TagSpecifications=[
                {
                    "ResourceType": "security-group",
                    "Tags": [
                        {"Key": CLUSTER_TAG, "Value": cluster},
                        {"Key": "Name", "Value": name},
                    ],
                }
            ],
        )
        group_id = str(response["GroupId"])
    except ClientError as e:
        if _error_code(e) != "InvalidGroup.Duplicate":
            raise ProviderError(f"CreateSecurityGroup {name}: {e}") from e
        group_id = await _adopt_group(ec2, cluster, vpc_id, name)
    try:
        await ec2.authorize_security_group_ingress(
            GroupId=group_id, IpPermissions=ingress_permissions(group_id, cidrs, ports)
        )
    except ClientError as e:
        raise ProviderError(f"AuthorizeSecurityGroupIngress {group_id}: {e}") from e
    logger.info("security group %s (%s): ports %s from %s", group_id, name, list(ports), cidrs)
    return group_id


async def _adopt_group(ec2: Any, cluster: str, vpc_id: str, name: str) -> str:
    """Take over this cluster's leftover group (a crashed earlier run): revoke its ingress."""
    response = await ec2.describe_security_groups(
        Filters=[
            {"Name": "group-name", "Values": [name]},
            {"Name": "vpc-id", "Values": [vpc_id]},
        ]
    )
    groups = response.get("SecurityGroups", [])
    tags = {t["Key"]: t["Value"] for g in groups for t in g.get("Tags", [])}
    if not groups or tags.get(CLUSTER_TAG) != cluster:
        raise ProviderError(
            f"CreateSecurityGroup: a group named {name} exists in {vpc_id} and is not "
            f"tagged {CLUSTER_TAG}={cluster}; choose another cluster name"
        )
    group_id = str(groups[0]["GroupId"])
    rules = await ec2.describe_security_group_rules(
        Filters=[{"Name": "group-id", "Values": [group_id]}]
    )
    ingress = [
        r["SecurityGroupRuleId"]
        for r in rules.get("SecurityGroupRules", [])
        if not r.get("IsEgress")
    ]
    if ingress:
        await ec2.revoke_security_group_ingress(GroupId=group_id, SecurityGroupRuleIds=ingress)
    logger.info("adopted leftover security group %s of cluster %s", group_id, cluster)
    return group_id


async def cluster_security_groups(ec2: Any, cluster: str) -> list[str]:
    """Ids of every security group tagged with ``cluster`` (for cleanup by tag)."""
    response = await ec2.describe_security_groups(
        Filters=[{"Name": f"tag:{CLUSTER_TAG}", "Values": [cluster]}]
    )
    return [str(g["GroupId"]) for g in response.get("SecurityGroups", [])]


async def delete_cluster_security_group(
    ec2: Any, group_id: str, timeout: float = 300.0, poll_interval: float = 2.0
) -> None:
    """Delete a cluster's security group, waiting while instances still hold it.

    EC2 refuses (``DependencyViolation``) until every instance in the group is
    terminated and its network interface released, which takes a while after
    TerminateInstances returns; so retry, backing off, until ``timeout``. A group
    already gone is fine.

    Parameters
    ----------
    ec2
        An aiobotocore EC2 client.
    group_id
        From :func:`create_cluster_security_group`.
    timeout
        Seconds to keep retrying.
    poll_interval
        First wait between attempts; doubles up to 15 s, with jitter.

    Raises
    ------
    ProviderError
        When the group is still in use at the deadline, or on any other error.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    delay = poll_interval
    while True:
        try:
            await ec2.delete_security_group(GroupId=group_id)
            return
        except ClientError as e:
            code = _error_code(e)
            if code == "InvalidGroup.NotFound":
                return
            if code != "DependencyViolation":
                raise ProviderError(f"DeleteSecurityGroup {group_id}: {e}") from e
            if loop.time() + delay > deadline:
                raise ProviderError(
                    f"DeleteSecurityGroup {group_id}: still in use after {timeout:.0f} s "
                    f"(instances not yet terminated?): {e}"
                ) from e
        await asyncio.sleep(delay * random.uniform(0.8, 1.2))
        delay = min(delay * 2, 15.0)
