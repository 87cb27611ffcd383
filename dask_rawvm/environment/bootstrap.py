"""The user-data script every VM boots with.

One script serves every provider: it learns who its machine is from the
provider's metadata prelude (the ``metadata`` argument: EC2's reads the instance
metadata service; the default, :data:`IDENTITY_FROM_VARIABLES`, reads variables the
provider sets, as the SSH provider does), makes sure the Dask environment is there,
runs the Dask scheduler or worker in the foreground, and powers the VM off when
that process exits. Instances launch with ``InstanceInitiatedShutdownBehavior``
``terminate``, so a Dask process that ends (retired, idle, scheduler gone past
the death timeout) never leaves a VM running.

The script is rendered as a block of quoted variable assignments over a static
body, so no value can change the script's meaning. It stays far below EC2's
16 KiB user-data limit and carries no secret: user-data is readable by anyone
with ``DescribeInstanceAttribute``.

Worker names are known before boot and never reused. A VM of a fleet (whose
instances come back in no particular order) finds its name in a map
``instance-id name`` that the cluster stores once the fleet answered, fetched by
an expiring URL; a machine launched as the ``i``-th of a run (SSH hosts) is
``<prefix><first + i>``. Either way one script serves every VM of one request.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

import dask

from dask_rawvm.environment.conda import conda_runtime_exports
from dask_rawvm.tls import vm_tls_script

USER_DATA_LIMIT = 16 * 1024
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787
# How often a worker VM checks for a spot interruption notice (EC2 gives 120 s).
SPOT_POLL_SECONDS = 2
# How long a fleet VM waits for the cluster to write its name (written within
# milliseconds of the launch call's answer; the VM may boot before that).
NAME_WAIT_SECONDS = 300
#: Where the ``instance-id name`` maps of fleet VMs are kept in the cluster's store.
NAMES_PREFIX = "names/"
#: Where VMs ship their logs in the cluster's store: ``logs/<machine id>.log``.
LOG_PREFIX = "logs/"
#: The end of a VM's log it ships: 1 MiB holds ~10,000 log lines, the boot and the last of
#: the Dask process (a worker on debug logging writes that in seconds; the start stays on
#: the console while the VM runs).
LOG_CAP_BYTES = 1024 * 1024

_PRELUDE = r"""
log() { echo "[dask-rawvm $(date -u +%H:%M:%S)] $*"; }
# A copy of this boot's output, whose end the machine ships to the cluster's store when it
# powers off or is terminated: its console goes with it.
if [ -n "${RAWVM_LOG_FORM_URL:-}" ]; then
    RAWVM_LOG_FILE=$(mktemp "${TMPDIR:-/tmp}/dask-rawvm-log.XXXXXX")
    # tee ignores SIGTERM (a terminated VM's processes all get one): it keeps copying
    # until the last writer is gone, the Dask process's goodbye included.
    exec 3>&1 4>&2 > >(trap '' TERM; exec tee -a "$RAWVM_LOG_FILE") 2>&1
    RAWVM_TEE=$!
fi
ship_log() {
    [ -n "${RAWVM_LOG_FORM:-}" ] && [ -n "${INSTANCE_ID:-}" ] || return 0
    local url=${RAWVM_LOG_FORM%%$'\n'*} fields=() field
    while IFS= read -r field; do [ -n "$field" ] && fields+=(--form-string "$field"); done \
        <<< "${RAWVM_LOG_FORM#*$'\n'}"
    RAWVM_LOG_FORM=""  # once
    log "shipping the log"
    exec 1>&3 2>&4  # the copy ends: tee writes what it has and exits (2 s at most)
    kill $(jobs -p) 2>/dev/null
    timeout 2 tail --pid="$RAWVM_TEE" -f /dev/null 2>/dev/null
    tail -c "$RAWVM_LOG_CAP" "$RAWVM_LOG_FILE" | curl -sf --max-time 20 -o /dev/null \
        "${fields[@]}" --form-string "key=${RAWVM_LOG_PREFIX}$INSTANCE_ID.log" \
        -F "file=@-;filename=log" "$url" || log "could not ship the log"
}
# Power off only a machine that is ours to power off (RAWVM_POWEROFF=no on shared hosts).
poweroff_vm() {
    ship_log
    if [ "${RAWVM_POWEROFF:-yes}" = yes ]; then log "powering off"; shutdown -h now; fi
    exit "${1:-0}"
}
"""
# Once the machine knows who it is: the form it ships its log with, kept in memory.
_LOG_FORM = r"""
if [ -n "${RAWVM_LOG_FORM_URL:-}" ]; then
    RAWVM_LOG_FORM=$(curl -sf --retry 10 --retry-connrefused "$RAWVM_LOG_FORM_URL") \
        || log "could not fetch the log upload form: the log stays on the console"
    trap 'log "terminated"; ship_log; exit 143' TERM
fi
"""

#: The default metadata prelude: a machine told who it is in variables (the SSH provider's
#: hosts: ``RAWVM_INSTANCE_ID``, ``RAWVM_ADDRESS``, ``RAWVM_LAUNCH_INDEX``), with no
#: metadata service and nobody to take it back. A provider's prelude (``metadata=``) sets
#: ``INSTANCE_ID`` and ``ADDRESS``, defines ``launch_index`` (prints the machine's index
#: in its launch request) and, where the cloud can take a machine back with notice (spot),
#: ``interruption_notice`` (succeeds once notice is given). It may call ``log`` and
#: ``poweroff_vm``.
IDENTITY_FROM_VARIABLES = r"""
INSTANCE_ID=${RAWVM_INSTANCE_ID:-}
ADDRESS=${RAWVM_ADDRESS:-}
[ -n "$INSTANCE_ID" ] && [ -n "$ADDRESS" ] \
    || { log "no RAWVM_INSTANCE_ID and RAWVM_ADDRESS for this machine"; poweroff_vm 1; }
launch_index() { echo "${RAWVM_LAUNCH_INDEX:-0}"; }
"""

# The user's environment, locked for this VM's platform, fetched by an expiring URL and
# set up by the bundle's setup.sh (dask_rawvm.environment.bundle.setup_script): installed
# with uv, itself fetched from the cluster's store (the image needs only curl), or unpacked
# from the artifact one VM built (dask_rawvm.environment.artifact).
_FETCH_BUNDLE = r"""
# Where environments live: per machine, shared by its Dask processes (a host of the
# SSH provider, or the local cloud's machine, which sets RAWVM_HOME for all its VMs).
RAWVM_HOME="${RAWVM_HOME:-${HOME:-/root}/dask-rawvm}"
RAWVM_BUNDLE="$RAWVM_HOME/bundle-$RAWVM_BUNDLE_DIGEST"
RAWVM_VENV="$RAWVM_HOME/venv-$RAWVM_BUNDLE_DIGEST"
export RAWVM_BUNDLE RAWVM_VENV
# Several Dask processes of one host (SSH provider) share the venv: one installs it
# while the others wait; a marker, written last, says an install is complete.
mkdir -p "$RAWVM_HOME" && exec 9>"$RAWVM_HOME/.install-$RAWVM_BUNDLE_DIGEST.lock"
command -v flock >/dev/null && flock 9
if [ ! -f "$RAWVM_VENV/.dask-rawvm-installed" ]; then
    log "installing environment ${RAWVM_BUNDLE_DIGEST:0:12}"
    mkdir -p "$RAWVM_BUNDLE"
    curl -sf --retry 10 --retry-connrefused -o "$RAWVM_BUNDLE.tar.gz" "$RAWVM_BUNDLE_URL" \
        && tar -xzf "$RAWVM_BUNDLE.tar.gz" -C "$RAWVM_BUNDLE" \
        || { log "could not fetch the environment bundle"; poweroff_vm 1; }
    if [ -n "${RAWVM_UV_URL:-}" ]; then
        RAWVM_UV="$RAWVM_HOME/tools/uv-$RAWVM_UV_KEY/uv"
        if [ ! -x "$RAWVM_UV" ]; then
            mkdir -p "${RAWVM_UV%/uv}"
            curl -sf --retry 10 --retry-connrefused -o "$RAWVM_UV.$$" "$RAWVM_UV_URL" \
                && chmod +x "$RAWVM_UV.$$" && mv "$RAWVM_UV.$$" "$RAWVM_UV" \
                || { log "could not fetch uv"; poweroff_vm 1; }
        fi
        export RAWVM_UV
    fi
    . "$RAWVM_BUNDLE/setup.sh"
    touch "$RAWVM_VENV/.dask-rawvm-installed"
    log "environment installed"
    # Published in the background, without the install lock: the Dask process starts now.
    if [ "$RAWVM_ARTIFACT_STATE" = builder ]; then
        ( exec 9>&-; renice -n 10 -p "$BASHPID" >/dev/null 2>&1; rawvm_artifact_publish ) &
    fi
fi
exec 9>&-
PYTHON="$RAWVM_VENV/bin/python"
"""
# Without a bundle (environment=None) the VM image must bring Python with Dask.
_IMAGE_PYTHON = r"""
PYTHON=$(command -v python3)
"$PYTHON" -c "import distributed" 2>/dev/null || {
    log "environment=None, but the image's python3 has no distributed $RAWVM_DASK_VERSION:" \
        "use an image with Dask installed, or let the cluster install the environment"
    poweroff_vm 1
}
"""
# The client's dask config (what the user set in code and YAML), as distributed's Nanny
# hands it to its workers: read by dask at import. DASK_* variables set later still win.
_CLIENT_CONFIG = r"""
if [ -n "${RAWVM_CONFIG_URL:-}" ]; then
    DASK_INTERNAL_INHERIT_CONFIG=$(curl -sf --retry 10 --retry-connrefused "$RAWVM_CONFIG_URL") \
        || { log "could not fetch the client's dask config"; poweroff_vm 1; }
    export DASK_INTERNAL_INHERIT_CONFIG
fi
"""

# Forwarded AWS credentials (dask_rawvm.data): the Dask process serves them on a loopback
# port of this VM, behind a token made here; SDKs read both variables when they start, so
# they are set before the Dask process starts. The token is made here and never leaves the
# VM; the credentials come later, over the cluster's TLS connection, and live in memory only.
_CREDENTIALS_ENDPOINT = r"""
if [ -n "${RAWVM_CREDENTIALS_ENDPOINT:-}" ]; then
    read -r RAWVM_CREDENTIALS_PORT AWS_CONTAINER_AUTHORIZATION_TOKEN < <("$PYTHON" -c '
import secrets, socket
s = socket.socket(); s.bind(("127.0.0.1", 0))
print(s.getsockname()[1], secrets.token_hex(32))') \
        || { log "could not choose a port for the credentials endpoint"; poweroff_vm 1; }
    AWS_CONTAINER_CREDENTIALS_FULL_URI="http://127.0.0.1:$RAWVM_CREDENTIALS_PORT/credentials"
    export RAWVM_CREDENTIALS_ENDPOINT AWS_CONTAINER_CREDENTIALS_FULL_URI
    export AWS_CONTAINER_AUTHORIZATION_TOKEN
fi
"""


@dataclass(frozen=True)
class EnvironmentRef:
    """Where a VM gets its environment, all by expiring URLs into the cluster's store.

    Parameters
    ----------
    digest, url
        The bundle's digest and URL.
    uv_url, uv_key
        The uv executable for the VM's architecture, and its name in the machine's tool
        cache (``0.13.9-aarch64``); None: the image's uv.
    index_url
        The install step's index settings (``export`` lines, credentials included); None:
        uv's defaults (PyPI).
    artifact_url
        The URLs of the environment's artifact in the account's artifact store
        (:func:`~dask_rawvm.environment.artifact.artifact_settings`); None: every VM
        installs the environment itself.
    """

    digest: str
    url: str
    uv_url: str | None = None
    uv_key: str | None = None
    index_url: str | None = None
    artifact_url: str | None = None


def _environment(ref: EnvironmentRef | None) -> tuple[dict[str, object], str]:
    if ref is None:
        return {}, _IMAGE_PYTHON
    variables: dict[str, object] = {
        "RAWVM_BUNDLE_DIGEST": ref.digest,
        "RAWVM_BUNDLE_URL": ref.url,
        "RAWVM_UV_URL": ref.uv_url,
        "RAWVM_UV_KEY": ref.uv_key,
        "RAWVM_INDEX_URL": ref.index_url,
        "RAWVM_ARTIFACT_URL": ref.artifact_url,
    }
    script = _FETCH_BUNDLE + conda_runtime_exports()
    return variables, script


_SCHEDULER = r"""
log "scheduler of cluster $RAWVM_CLUSTER on $INSTANCE_ID ($ADDRESS)"
ARGS=(--host "$ADDRESS" --port "$RAWVM_SCHEDULER_PORT"
      --dashboard-address "$ADDRESS:$RAWVM_DASHBOARD_PORT")
# tls when the VM got the cluster's certificates (mutual TLS: plain TCP is refused).
[ -n "${RAWVM_DASK_SCHEME:-}" ] && ARGS+=(--protocol "$RAWVM_DASK_SCHEME")
# dask_rawvm's scheduler preloads, where the environment has it (an image may not):
# workers retired together are not told of each other (dask_rawvm.bulk_retire), and
# idle = no client and no task (dask_rawvm.idle_shutdown); distributed's own idle timeout
# ignores clients, and is the fallback.
if "$PYTHON" -c "import dask_rawvm.bulk_retire, dask_rawvm.idle_shutdown" 2>/dev/null; then
    ARGS+=(--preload dask_rawvm.bulk_retire)
    if [ -n "$RAWVM_IDLE_TIMEOUT" ]; then
        export RAWVM_IDLE_TIMEOUT
        ARGS+=(--preload dask_rawvm.idle_shutdown)
    fi
elif [ -n "$RAWVM_IDLE_TIMEOUT" ]; then
    ARGS+=(--idle-timeout "${RAWVM_IDLE_TIMEOUT}s")
fi
# A descriptor per worker's stream, more for its RPC pool (distributed caps the pool at half
# the soft limit): the soft limit a boot script inherits from systemd (1024) refuses workers
# past ~500 and stalls broadcasts past ~500. The hard limit (524288 on AL2023) is ours to take.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
"$PYTHON" -m distributed.cli.dask_scheduler "${ARGS[@]}"
log "scheduler exited with code $?"
poweroff_vm
"""

_WORKER = r"""
if [ -n "$RAWVM_NAMES_URL" ]; then
    NAME=""
    for _ in $(seq 1 "$RAWVM_NAME_WAIT"); do
        NAME=$(curl -sf "$RAWVM_NAMES_URL" | awk -v id="$INSTANCE_ID" '$1 == id {print $2}')
        [ -n "$NAME" ] && break
        sleep 1
    done
    [ -n "$NAME" ] || { log "the cluster named no worker $INSTANCE_ID"; poweroff_vm 1; }
else
    INDEX=$(launch_index)
    NAME="$RAWVM_NAME_PREFIX$((RAWVM_FIRST_INDEX + INDEX))"
fi
log "worker $NAME of cluster $RAWVM_CLUSTER on $INSTANCE_ID ($ADDRESS)"
# A machine the cloud takes back with notice (spot): retire gracefully, so its data moves first.
watch_for_interruption() {
    while sleep "$RAWVM_SPOT_POLL"; do
        interruption_notice || continue
        log "spot interruption notice: retiring $NAME"
        "$PYTHON" -c "$RETIRE" "$RAWVM_SCHEDULER" "$NAME" || log "retirement failed"
        return
    done
}
RETIRE='
import asyncio, sys
from distributed import Security
from distributed.core import rpc
async def retire(address, name):
    args = Security().get_connection_args("client")
    async with rpc(address, connection_args=args) as scheduler:
        await scheduler.retire_workers(names=[name], close_workers=True, remove=True)
asyncio.run(retire(*sys.argv[1:]))
'
declare -F interruption_notice >/dev/null && watch_for_interruption &
ARGS=(--name "$NAME" --host "$ADDRESS" --death-timeout "$RAWVM_DEATH_TIMEOUT"
      --memory-limit "$RAWVM_MEMORY_LIMIT")
[ -n "$RAWVM_NTHREADS" ] && ARGS+=(--nthreads "$RAWVM_NTHREADS")
[ -n "${RAWVM_DASK_SCHEME:-}" ] && ARGS+=(--protocol "$RAWVM_DASK_SCHEME")
"$PYTHON" -m distributed.cli.dask_worker "$RAWVM_SCHEDULER" "${ARGS[@]}"
log "worker exited with code $?"
poweroff_vm
"""


def _tls(secrets_url: str | None) -> tuple[dict[str, object], str]:
    """Mutual TLS with the cluster's CA: key and certificates fetched by an expiring URL."""
    if secrets_url is None:
        return {}, ""
    return {"RAWVM_SECRETS_URL": secrets_url}, vm_tls_script(on_failure="poweroff_vm 1")


def _render(
    variables: dict[str, object],
    body: str,
    environment: EnvironmentRef | None,
    secrets_url: str | None = None,
    metadata: str = IDENTITY_FROM_VARIABLES,
    config_url: str | None = None,
    log_url: str | None = None,
    credentials_endpoint: bool = False,
) -> str:
    env_variables, env_script = _environment(environment)
    tls_variables, tls_script = _tls(secrets_url)
    config = {
        "RAWVM_CONFIG_URL": config_url,
        "RAWVM_LOG_FORM_URL": log_url,
        "RAWVM_LOG_PREFIX": LOG_PREFIX,
        "RAWVM_LOG_CAP": LOG_CAP_BYTES,
        "RAWVM_CREDENTIALS_ENDPOINT": "yes" if credentials_endpoint else None,
    }
    header = "\n".join(
        f"{key}={shlex.quote('' if value is None else str(value))}"
        for key, value in {**variables, **env_variables, **tls_variables, **config}.items()
    )
    script = (
        f"#!/bin/bash\n# dask-rawvm bootstrap\nset -u\n{header}\n"
        f"{_PRELUDE}{metadata}{_LOG_FORM}{tls_script}{env_script}{_CLIENT_CONFIG}"
        f"{_CREDENTIALS_ENDPOINT}{body}"
    )
    if len(script.encode()) > USER_DATA_LIMIT:
        raise ValueError(
            f"bootstrap script is {len(script.encode())} bytes, over EC2's 16 KiB user-data limit"
        )
    return script


def scheduler_script(
    cluster: str,
    idle_timeout: float | None,
    environment: EnvironmentRef | None = None,
    secrets_url: str | None = None,
    metadata: str = IDENTITY_FROM_VARIABLES,
    config_url: str | None = None,
    log_url: str | None = None,
    credentials_endpoint: bool = False,
) -> str:
    """User-data for the scheduler VM.

    Parameters
    ----------
    cluster
        The cluster's name (for the log).
    idle_timeout
        Seconds with no client and no task after which the scheduler exits and
        its VM powers off; None never.
    environment
        The environment bundle to install; the image's Python when None.
    secrets_url
        An expiring URL of the VM's TLS key and certificates
        (:func:`dask_rawvm.tls.pack_vm_material`); plain TCP when None.
    metadata
        The provider's metadata prelude (see :data:`IDENTITY_FROM_VARIABLES`).
    config_url
        An expiring URL of the client's dask config (``dask.config.serialize``); the
        image's defaults when None.
    log_url
        An expiring URL of the form the VM ships the end of its log with when it powers
        off or is terminated (:data:`LOG_CAP_BYTES`, under :data:`LOG_PREFIX`); not
        shipped when None.
    credentials_endpoint
        Whether the Dask process serves forwarded AWS credentials
        (:class:`dask_rawvm.data.CredentialEndpoint`).
    """
    return _render(
        {
            "RAWVM_CLUSTER": cluster,
            "RAWVM_DASK_VERSION": dask.__version__,
            "RAWVM_SCHEDULER_PORT": SCHEDULER_PORT,
            "RAWVM_DASHBOARD_PORT": DASHBOARD_PORT,
            "RAWVM_IDLE_TIMEOUT": None if idle_timeout is None else int(idle_timeout),
        },
        _SCHEDULER,
        environment,
        secrets_url,
        metadata,
        config_url,
        log_url,
        credentials_endpoint,
    )


def worker_script(
    cluster: str,
    scheduler_address: str,
    name_prefix: str,
    first_index: int,
    death_timeout: float,
    nthreads: int | None = None,
    memory_limit: str = "auto",
    environment: EnvironmentRef | None = None,
    names_url: str | None = None,
    secrets_url: str | None = None,
    metadata: str = IDENTITY_FROM_VARIABLES,
    config_url: str | None = None,
    log_url: str | None = None,
    credentials_endpoint: bool = False,
) -> str:
    """User-data for the worker VMs of one launch request.

    Parameters
    ----------
    cluster
        The cluster's name (for the log).
    scheduler_address
        Address the workers reach the scheduler at (its private address).
    name_prefix, first_index
        Without ``names_url``, the VM with launch index ``i`` is the worker
        ``f"{name_prefix}{first_index + i}"``.
    death_timeout
        Seconds a worker keeps trying to reach a missing scheduler before it exits.
    nthreads
        Threads per worker; Dask's default (the VM's CPU count) when None.
    memory_limit
        The Dask worker's ``--memory-limit``.
    environment
        The environment bundle to install; the image's Python when None.
    names_url
        An expiring URL of the ``instance-id name`` map of this request's VMs.
    secrets_url
        An expiring URL of the VMs' TLS key and certificates; plain TCP when None.
    metadata
        The provider's metadata prelude (see :data:`IDENTITY_FROM_VARIABLES`).
    config_url
        An expiring URL of the client's dask config; the image's defaults when None.
    log_url
        As for :func:`scheduler_script`.
    credentials_endpoint
        Whether the Dask process serves forwarded AWS credentials
        (:class:`dask_rawvm.data.CredentialEndpoint`): the boot script sets the variables
        SDKs read before it starts it.
    """
    return _render(
        {
            "RAWVM_CLUSTER": cluster,
            "RAWVM_DASK_VERSION": dask.__version__,
            "RAWVM_SCHEDULER": scheduler_address,
            "RAWVM_NAMES_URL": names_url,
            "RAWVM_NAME_WAIT": NAME_WAIT_SECONDS,
            "RAWVM_NAME_PREFIX": name_prefix,
            "RAWVM_FIRST_INDEX": first_index,
            "RAWVM_DEATH_TIMEOUT": int(death_timeout),
            "RAWVM_NTHREADS": nthreads,
            "RAWVM_MEMORY_LIMIT": memory_limit,
            "RAWVM_SPOT_POLL": SPOT_POLL_SECONDS,
        },
        _WORKER,
        environment,
        secrets_url,
        metadata,
        config_url,
        log_url,
        credentials_endpoint,
    )
