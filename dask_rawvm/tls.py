"""TLS by default: a certificate authority per cluster, and secrets kept out of user-data.

Two things, each closed by default (the third, a firewall per cluster, is the cloud's:
:mod:`dask_rawvm.providers.ec2.security_groups` for EC2):

- **TLS everywhere.** :class:`ClusterTLS` makes a certificate authority for one
  cluster and issues the scheduler's, the workers' and the client's certificates
  from it. Every Dask connection is mutual TLS: both ends present a certificate
  signed by *this cluster's* CA and refuse anything else, including plain TCP.
- **Clients of this process need nothing more.** ``Client(cluster)`` takes the
  cluster's ``security``; ``Client(cluster.scheduler_address)`` gets it from
  :func:`security_for_address`, the ``distributed.client.security-loader`` a cluster
  installs when it starts (unless the user configured a loader of their own).
- **No secret in user-data.** User-data is readable by anyone allowed
  ``DescribeInstanceAttribute`` and is capped at 16 KiB. A VM's key and
  certificates travel in a small tar (:func:`pack_vm_material`) that the cluster
  stores where its provider keeps files (an S3 bucket on EC2); user-data carries
  only :func:`vm_tls_script` and an expiring URL to it.

Hostnames are not checked, by design: Dask's TLS contexts use
``verify_mode=CERT_REQUIRED`` with ``check_hostname=False``
(:meth:`distributed.security.Security._get_tls_context`, "we expect a dedicated
CA for the cluster and people using IP addresses"). A worker's address is not
known before it boots, so its certificate cannot name it; trust comes from the
per-cluster CA alone, which is exactly what a CA per cluster is for.
"""

from __future__ import annotations

import datetime
import io
import ipaddress
import tarfile
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import dask.config
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from distributed.security import Security

# -- clients of this process ------------------------------------------------------------------


class HasSecurity(Protocol):
    """What a cluster offers its clients: the :class:`Security` to connect with."""

    security: Security


#: The running clusters of this process, by every scheduler address a client may dial;
#: held weakly, so a cluster dropped or closed falls out by itself.
_CLUSTERS: weakref.WeakValueDictionary[str, Any] = weakref.WeakValueDictionary()


#: The loader, as distributed's ``distributed.client.security-loader`` names it.
SECURITY_LOADER = f"{__name__}.security_for_address"


def offer_security(owner: HasSecurity, addresses: Iterable[str | None]) -> None:
    """Let this process's clients of ``addresses`` connect with ``owner.security``.

    Installs :func:`security_for_address` as distributed's security loader, unless
    one is configured already (the user's own wins; then ``Client(address)`` needs
    ``security=cluster.security``).
    """
    if dask.config.get("distributed.client.security-loader", None) is None:
        # Set for the process, not in a context: it must outlive this call, and it only
        # ever answers for addresses of this process's clusters.
        dask.config.set({"distributed.client.security-loader": SECURITY_LOADER})
    for address in addresses:
        if address:
            _CLUSTERS[address] = owner


def withdraw_security(owner: HasSecurity) -> None:
    """Forget every address :func:`offer_security` gave ``owner`` (the cluster closed)."""
    for address, held in list(_CLUSTERS.items()):
        if held is owner:
            _CLUSTERS.pop(address, None)


def security_for_address(info: Mapping[str, Any]) -> Security | None:
    """distributed's ``security-loader`` hook: the Security of this process's cluster at
    ``info["address"]``, for a ``Client(address)`` given none; None for any other address
    (distributed's default Security then)."""
    owner = _CLUSTERS.get(str(info.get("address")))
    return None if owner is None else owner.security


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

        For the cluster's store (:func:`pack_vm_material`), never for user-data: it holds a
        private key. One bundle serves every VM of a launch call (their addresses are unknown
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

    Reads ``$RAWVM_SECRETS_URL`` (an expiring URL of a :func:`pack_vm_material` tar), downloads the
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
