"""The user-data script every VM boots with.

One script serves EC2 and the local cloud: it reads the instance metadata
(IMDSv2) at ``$RAWVM_IMDS``, which the local cloud sets and EC2 leaves unset
(so it is ``169.254.169.254``), makes sure the Dask environment is there,
runs the Dask scheduler or worker in the foreground, and powers the VM off when
that process exits. Instances launch with ``InstanceInitiatedShutdownBehavior``
``terminate``, so a Dask process that ends (retired, idle, scheduler gone past
the death timeout) never leaves a VM running.

The script is rendered as a block of quoted variable assignments over a static
body, so no value can change the script's meaning. It stays far below EC2's
16 KiB user-data limit and carries no secret: user-data is readable by anyone
with ``DescribeInstanceAttribute``.

Worker names are known before boot and never reused: one launch call starts a
run of workers named ``<prefix><first + i>``, where ``i`` is the instance's
``ami-launch-index``, so a single script serves every VM of one call.
"""

from __future__ import annotations

import shlex

import dask

USER_DATA_LIMIT = 16 * 1024
SCHEDULER_PORT = 8786
DASHBOARD_PORT = 8787

_PRELUDE = r"""
log() { echo "[dask-rawvm $(date -u +%H:%M:%S)] $*"; }
IMDS="${RAWVM_IMDS:-http://169.254.169.254}"
TOKEN=$(curl -sf --retry 10 --retry-connrefused -X PUT \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" "$IMDS/latest/api/token")
meta() { curl -sf --retry 5 -H "X-aws-ec2-metadata-token: $TOKEN" "$IMDS/latest/meta-data/$1"; }
poweroff_vm() { log "powering off"; shutdown -h now; exit "${1:-0}"; }
INSTANCE_ID=$(meta instance-id)
ADDRESS=$(meta local-ipv4)
[ -n "$ADDRESS" ] || { log "no instance metadata at $IMDS"; poweroff_vm 1; }
"""

# Issue #4 replaces this with the locked environment bundle; until then the VM
# image must have Python, or gets the client's dask version from PyPI.
_ENVIRONMENT = r"""
PYTHON=$(command -v python3)
if ! "$PYTHON" -c "import distributed" 2>/dev/null; then
    log "installing dask $RAWVM_DASK_VERSION"
    "$PYTHON" -m pip install --quiet "dask[distributed]==$RAWVM_DASK_VERSION" bokeh \
        || { log "environment install failed"; poweroff_vm 1; }
fi
"""

_SCHEDULER = r"""
log "scheduler of cluster $RAWVM_CLUSTER on $INSTANCE_ID ($ADDRESS)"
ARGS=(--host "$ADDRESS" --port "$RAWVM_SCHEDULER_PORT"
      --dashboard-address "$ADDRESS:$RAWVM_DASHBOARD_PORT")
[ -n "$RAWVM_IDLE_TIMEOUT" ] && ARGS+=(--idle-timeout "${RAWVM_IDLE_TIMEOUT}s")
"$PYTHON" -m distributed.cli.dask_scheduler "${ARGS[@]}"
log "scheduler exited with code $?"
poweroff_vm
"""

_WORKER = r"""
INDEX=$(meta ami-launch-index)
NAME="$RAWVM_NAME_PREFIX$((RAWVM_FIRST_INDEX + INDEX))"
log "worker $NAME of cluster $RAWVM_CLUSTER on $INSTANCE_ID ($ADDRESS)"
ARGS=(--name "$NAME" --host "$ADDRESS" --death-timeout "$RAWVM_DEATH_TIMEOUT"
      --memory-limit "$RAWVM_MEMORY_LIMIT")
[ -n "$RAWVM_NTHREADS" ] && ARGS+=(--nthreads "$RAWVM_NTHREADS")
"$PYTHON" -m distributed.cli.dask_worker "$RAWVM_SCHEDULER" "${ARGS[@]}"
log "worker exited with code $?"
poweroff_vm
"""


def _render(variables: dict[str, object], body: str) -> str:
    header = "\n".join(
        f"{key}={shlex.quote('' if value is None else str(value))}"
        for key, value in variables.items()
    )
    script = (
        f"#!/bin/bash\n# dask-rawvm bootstrap\nset -u\n{header}\n{_PRELUDE}{_ENVIRONMENT}{body}"
    )
    if len(script.encode()) > USER_DATA_LIMIT:
        raise ValueError(
            f"bootstrap script is {len(script.encode())} bytes, over EC2's 16 KiB user-data limit"
        )
    return script


def scheduler_script(cluster: str, idle_timeout: float | None) -> str:
    """User-data for the scheduler VM.

    Parameters
    ----------
    cluster
        The cluster's name (for the log).
    idle_timeout
        Seconds with no client and no task after which the scheduler exits and
        its VM powers off; None never.
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
    )


def worker_script(
    cluster: str,
    scheduler_address: str,
    name_prefix: str,
    first_index: int,
    death_timeout: float,
    nthreads: int | None = None,
    memory_limit: str = "auto",
) -> str:
    """User-data for a run of worker VMs launched in one call.

    Parameters
    ----------
    cluster
        The cluster's name (for the log).
    scheduler_address
        Address the workers reach the scheduler at (its private address).
    name_prefix, first_index
        The VM with launch index ``i`` is the worker ``f"{name_prefix}{first_index + i}"``.
    death_timeout
        Seconds a worker keeps trying to reach a missing scheduler before it exits.
    nthreads
        Threads per worker; Dask's default (the VM's CPU count) when None.
    memory_limit
        The Dask worker's ``--memory-limit``.
    """
    return _render(
        {
            "RAWVM_CLUSTER": cluster,
            "RAWVM_DASK_VERSION": dask.__version__,
            "RAWVM_SCHEDULER": scheduler_address,
            "RAWVM_NAME_PREFIX": name_prefix,
            "RAWVM_FIRST_INDEX": first_index,
            "RAWVM_DEATH_TIMEOUT": int(death_timeout),
            "RAWVM_NTHREADS": nthreads,
            "RAWVM_MEMORY_LIMIT": memory_limit,
        },
        _WORKER,
    )
