"""What a cluster keeps where its machines fetch it: environment bundles, uv, index settings,
the client's dask config, TLS secrets, name maps; and the URLs of each environment's artifact
in the account's artifact store, when the provider keeps one.

Everything goes through the provider's storage (:meth:`~dask_rawvm.providers.base.Provider.store`,
:meth:`~dask_rawvm.providers.base.Provider.url_for`): an S3 bucket of the cluster on
EC2, each host's cache over SSH. User-data carries expiring URLs to them, never their
content.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shlex
import tempfile
import time
from functools import partial
from typing import cast

from distributed.security import Security

from dask_rawvm.environment import Bundle, Target, prepare_environment
from dask_rawvm.environment.artifact import artifact_key, artifact_settings
from dask_rawvm.environment.bootstrap import (
    LOG_CAP_BYTES,
    LOG_PREFIX,
    NAMES_PREFIX,
    EnvironmentRef,
)
from dask_rawvm.environment.dask_config import serialize
from dask_rawvm.environment.lock import Resolver
from dask_rawvm.environment.tools import uv_for, uv_version
from dask_rawvm.errors import ProviderError
from dask_rawvm.machines.session import ProviderSession
from dask_rawvm.tls import (
    CA_FILE,
    CERT_FILE,
    KEY_FILE,
    ClusterTLS,
    pack_vm_material,
    security_from_material,
    unpack_vm_material,
)

logger = logging.getLogger(__name__)

#: How long the URLs of an environment's artifact stay valid: a VM that lands late (asked
#: for in the background up to ``capacity_retry_timeout``) still builds, waits or unpacks
#: with them, and a builder may take a while to publish (a presigned URL signed with
#: temporary credentials dies with them earlier).
ARTIFACT_URL_EXPIRY = 6 * 3600


class ClusterStore:
    """A cluster's files in its provider's storage, and the URLs its machines fetch them by.

    Parameters
    ----------
    cluster
        The cluster's name.
    session
        The cluster's provider.
    """

    def __init__(self, cluster: str, session: ProviderSession) -> None:
        self.cluster = cluster
        self.session = session
        self.bundles: dict[str, Bundle] = {}  # the environment of each role's VMs
        self._uv: set[str] = set()  # uv executables stored, by "<version>-<arch>"
        self._uv_of: dict[str, str] = {}  # each role's uv
        self._indexes: set[str] = set()  # roles whose install step has index settings
        self._configs: set[str] = set()  # dask configs stored, by key
        self._secrets: dict[str, str] = {}  # stored key of each role's TLS material
        self._log_form_made: float | None = None  # when the log upload form was stored
        #: What this process presents: the client's certificate (mutual TLS), once made.
        self.client_security: Security | None = None
        #: What an in-process scheduler presents (the scheduler VM role's certificate).
        self.scheduler_security: Security | None = None

    # -- environments --------------------------------------------------------------------
    async def prepare_environments(
        self,
        targets: dict[str, Target],
        environment: object,
        ignore: list[str],
        resolver: str,
        local_code: bool = True,
    ) -> None:
        """Lock and bundle the environment for each role's platform, and store it with
        what the VM's boot needs besides: uv for its architecture, and the index settings
        of its install step (a secret: they may hold credentials).

        Runs before anything is launched, so an environment that cannot be built
        for the VMs is an error that costs nothing.
        """
        provider = self.session.provider
        for role, target in targets.items():
            bundle = await asyncio.to_thread(
                partial(
                    prepare_environment,
                    environment,  # type: ignore[arg-type]
                    target,
                    ignore,
                    resolver=cast(Resolver, resolver),
                    local_code=local_code,
                )
            )
            if bundle.digest not in {b.digest for b in self.bundles.values()}:
                with tempfile.TemporaryDirectory() as tmp:
                    archive = await asyncio.to_thread(bundle.write_archive, tmp)
                    await provider.store(_bundle_key(bundle), str(archive))
            uv_key = f"{uv_version()}-{target.arch}"
            if uv_key not in self._uv:
                uv = await asyncio.to_thread(uv_for, target)
                await provider.store(_uv_key(uv_key), str(uv))
                self._uv.add(uv_key)
            settings = _index_settings(bundle)
            if settings:
                await provider.store_bytes(_index_key(role), settings.encode())
                self._indexes.add(role)
            self.bundles[role] = bundle
            self._uv_of[role] = uv_key
            lock = "cached lock" if bundle.lock.from_cache else "resolved"
            logger.info("environment for %s VMs: %s (%s)", role, bundle.digest[:12], lock)

    async def environment(self, role: str) -> EnvironmentRef | None:
        """Where a VM of ``role`` gets its environment; None for the image's own Python."""
        bundle = self.bundles.get(role)
        if bundle is None:
            return None
        provider = self.session.provider
        uv_key = self._uv_of[role]
        index_url = await provider.url_for(_index_key(role)) if role in self._indexes else None
        return EnvironmentRef(
            bundle.digest,
            await provider.url_for(_bundle_key(bundle)),
            uv_url=await provider.url_for(_uv_key(uv_key)),
            uv_key=uv_key,
            index_url=index_url,
            artifact_url=await self._artifact_url(bundle),
        )

    async def _artifact_url(self, bundle: Bundle) -> str | None:
        """The URL of the settings that lead a VM to the environment's artifact, stored for
        this launch (fresh URLs each time); None when the provider keeps no artifacts."""
        provider = self.session.provider
        urls = await provider.artifact_urls(artifact_key(bundle.digest), ARTIFACT_URL_EXPIRY)
        if urls is None:
            return None
        key = _artifact_settings_key(bundle)
        await provider.store_bytes(key, artifact_settings(urls).encode())
        return await provider.url_for(key, expires=ARTIFACT_URL_EXPIRY)

    # -- the client's dask config ------------------------------------------------------------
    async def config_url(self) -> str:
        """An expiring URL of this process's dask config, as the VMs get it
        (:func:`~dask_rawvm.environment.dask_config.serialize`), stored once per content:
        a VM launched after a ``dask.config.set`` gets the config of its launch."""
        text = serialize()
        key = f"config/{hashlib.sha256(text.encode()).hexdigest()[:16]}.txt"
        if key not in self._configs:
            await self.session.provider.store_bytes(key, text.encode())
            self._configs.add(key)
        return await self.session.provider.url_for(key)

    # -- TLS -----------------------------------------------------------------------------
    async def create_tls(self) -> Security:
        """A new CA for the cluster; each VM role's key and certificates stored for the VMs
        to fetch (never in user-data), and the client's for a client that reconnects.

        Returns the client's :class:`~distributed.security.Security`.
        """
        tls = ClusterTLS.create(self.cluster)
        cert, key = tls.issue("client")
        client = {CA_FILE: tls.ca_cert_pem, CERT_FILE: cert, KEY_FILE: key}
        materials = {role: tls.vm_material(role) for role in ("scheduler", "worker")}
        await self._store_secrets({**materials, "client": client})
        self.client_security = security_from_material(client)
        self.scheduler_security = security_from_material(materials["scheduler"])
        return self.client_security

    async def reuse_tls(self) -> Security:
        """The TLS material of the running cluster this client reconnects to."""
        provider = self.session.provider
        materials = {
            role: unpack_vm_material(await provider.fetch(_secret_key(role)))
            for role in ("worker", "client")
        }
        await self._store_secrets(materials)  # this client's bucket, for the VMs it launches
        self.client_security = security_from_material(materials["client"])
        return self.client_security

    async def secrets_url(self, role: str) -> str | None:
        """An expiring URL of ``role``'s TLS material; None without TLS."""
        if role not in self._secrets:
            return None
        return await self.session.provider.url_for(self._secrets[role])

    async def _store_secrets(self, materials: dict[str, dict[str, str]]) -> None:
        for role, material in materials.items():
            self._secrets[role] = _secret_key(role)
            await self.session.provider.store_bytes(self._secrets[role], pack_vm_material(material))

    # -- the machines' logs ------------------------------------------------------------------
    async def log_upload_url(self) -> str | None:
        """An expiring URL of the form each VM ships its log with when it powers off
        (:meth:`~dask_rawvm.providers.base.Provider.upload_form`); None where VMs cannot
        upload. The form lasts :data:`LOG_UPLOAD_SECONDS`; a new one is made when the
        stored one has less than a day left."""
        now = time.time()
        if self._log_form_made is None or now - self._log_form_made > LOG_UPLOAD_SECONDS - 86400:
            form = await self.session.provider.upload_form(
                LOG_PREFIX, LOG_CAP_BYTES, LOG_UPLOAD_SECONDS
            )
            if form is None:
                return None
            await self.session.provider.store_bytes(_LOG_FORM_KEY, form.encode())
            self._log_form_made = now
        return await self.session.provider.url_for(_LOG_FORM_KEY)

    async def shipped_log(self, machine_id: str) -> str | None:
        """The log machine ``machine_id`` shipped when it powered off; None if none did."""
        try:
            data = await self.session.provider.fetch(log_key(machine_id))
        except ProviderError:  # not shipped (yet), or a provider without a store of files
            return None
        return data.decode(errors="replace")

    # -- worker names ----------------------------------------------------------------------
    async def names_url(self, batch: str, expires: int) -> str:
        """The expiring URL the VMs of launch request ``batch`` find their names at."""
        return await self.session.provider.url_for(_names_key(batch), expires=expires)

    async def write_names(self, batch: str, names: dict[str, str]) -> None:
        """Store the ``instance-id name`` map of launch request ``batch``."""
        lines = "".join(f"{machine_id} {name}\n" for machine_id, name in names.items())
        await self.session.provider.store_bytes(_names_key(batch), lines.encode())


#: How long a VM can ship its log after launch: 7 days, SigV4's longest presigned expiry.
LOG_UPLOAD_SECONDS = 7 * 24 * 3600
_LOG_FORM_KEY = "secrets/log-upload.form"


def log_key(machine_id: str) -> str:
    """Where the machine ``machine_id`` ships its log."""
    return f"{LOG_PREFIX}{machine_id}.log"


def _bundle_key(bundle: Bundle) -> str:
    return f"environments/{bundle.digest}.tar.gz"


def _uv_key(name: str) -> str:
    return f"tools/uv-{name}"


def _artifact_settings_key(bundle: Bundle) -> str:
    return f"secrets/artifact-{bundle.digest[:16]}.env"


def _index_key(role: str) -> str:
    return f"secrets/index-{role}.env"


#: Client variables the VMs' install step gets too: uv's managed-Python download mirror (a
#: locked-down account serves Python builds from its own bucket).
FORWARDED_UV_VARIABLES = ("UV_PYTHON_INSTALL_MIRROR",)


def _index_settings(bundle: Bundle) -> str:
    """The install step's index settings as shell ``export`` lines ("" for uv's defaults)."""
    variables = bundle.lock.index.install_environment()
    variables.update({k: os.environ[k] for k in FORWARDED_UV_VARIABLES if os.environ.get(k)})
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(variables.items()))


def _secret_key(role: str) -> str:
    return f"secrets/{role}.tar"


def _names_key(batch: str) -> str:
    return f"{NAMES_PREFIX}{batch}.txt"
