"""Build once, ship everywhere: an installed environment as an artifact the other VMs unpack.

Installing an environment from the package index on every VM has every VM download the same
packages and pay the same install. Instead, for each environment (a bundle digest, which
fixes the platform: architecture, accelerator, Python minor, glibc) one VM installs it and
packs the result, a relocatable venv, as an *artifact* in the account's artifact store (an
S3 bucket of the account and region on EC2, kept across clusters, with an expiry rule). Every
other VM, of this cluster or of a later one, downloads and unpacks it: the package index sees
one install per environment, not one per VM.

Who builds is settled through the store itself, by a conditional write: a VM that finds no
artifact writes a *claim* object with ``If-None-Match: *``; the one write that succeeds makes
its VM the builder; every other VM's is refused (HTTP 412), and it waits for the artifact
(polling every few seconds, for at most :data:`BUILD_WAIT_SECONDS`) instead of installing
too. The scheduler VM boots first, so it is the builder whenever the workers share its
platform, and the workers find the artifact ready; workers of another platform elect one of
themselves. Nothing of the client is involved: a client's platform (a laptop) rarely is
the VMs', and a VM uploads within the cloud's network.

The artifact (``.tar.gz``, gzip level 1: packing competes with the builder's own Dask
process for CPU)::

    dask-rawvm-artifact     format, digest, Python, the venv's path, the VM that built it
    venv/                   the venv (``uv venv --relocatable``), without __pycache__
    python/<name>/          (when the venv's Python is uv's managed one) that Python

Unpacking puts ``venv/`` at the VM's own ``$RAWVM_VENV`` and points it at the VM's Python
of the same minor (``uv venv --allow-existing --relocatable`` rewrites ``pyvenv.cfg``'s
``home`` and the ``bin/python`` links; the scripts of a relocatable venv find their
interpreter relative to themselves), so it needs neither the builder's venv path nor its
interpreter path; a uv-managed Python the builder downloaded comes with it, so the other VMs
download no Python either. Conda packages are not relocatable (their files hold their prefix):
an artifact with conda packages is only unpacked at the venv path it was built at (on EC2
every VM of an image has the same one).

Whatever goes wrong falls back to a normal install with a warning in the boot log: no
artifact store (or one the VM cannot reach), a corrupt or truncated artifact, an artifact
whose Python does not start, a builder that failed (it replaces the artifact by a short
note saying why, so the VMs waiting for it install at once) or never finished.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

#: Bumped when the artifact's layout changes: a new layout is a new key.
ARTIFACT_FORMAT = 1
#: How long a VM waits for another VM's build before it installs the environment itself.
#: An install from the index of a large data-science environment takes a few minutes on
#: EC2; a builder that died must not keep the others waiting for longer than this.
BUILD_WAIT_SECONDS = 1200
#: Seconds between two looks for an artifact being built (plus up to 2 s of jitter, so
#: a thousand waiting VMs do not ask at once; S3 serves thousands of GETs a second).
POLL_SECONDS = 2
#: The artifact's content type; anything else at its key is a builder's failure note.
ARCHIVE_TYPE = "application/gzip"
NOTE_TYPE = "text/plain"


@dataclass(frozen=True)
class ArtifactURLs:
    """Expiring URLs of one environment's artifact in the account's artifact store.

    Parameters
    ----------
    get
        GET of the artifact.
    put
        PUT of the artifact (sent with ``If-None-Match: *``: an artifact is written once).
    claim
        PUT of the builder's claim (``If-None-Match: *``: one VM wins).
    """

    get: str
    put: str
    claim: str


def artifact_key(digest: str) -> str:
    """Where the artifact of the environment bundle ``digest`` lives in the store (a prefix:
    ``<key>/venv.tar.gz`` and ``<key>/claim``)."""
    return f"v{ARTIFACT_FORMAT}/{digest}"


def artifact_settings(urls: ArtifactURLs) -> str:
    """The artifact's URLs as the boot script reads them (shell assignments).

    They are stored in the cluster's store and fetched by an expiring URL, never put in
    user-data: the PUT URLs let whoever holds them write the artifact every later VM runs.
    """
    values = {
        "RAWVM_ARTIFACT_GET": urls.get,
        "RAWVM_ARTIFACT_PUT": urls.put,
        "RAWVM_ARTIFACT_CLAIM": urls.claim,
    }
    return "".join(f"{key}={shlex.quote(value)}\n" for key, value in values.items())


_FETCH = r"""# dask-rawvm: the environment's artifact (dask_rawvm.environment.artifact):
# unpack it, or build it for the other VMs, or wait for the VM that builds it. Sets
# RAWVM_ARTIFACT_STATE to "unpacked", "builder" (install, then publish) or "none" (install).
RAWVM_ARTIFACT_STATE=none
rawvm_artifact_dir="$RAWVM_HOME/artifact-$RAWVM_BUNDLE_DIGEST"
rawvm_artifact_started=$(date +%s)
mkdir -p "$rawvm_artifact_dir"
# The artifact's first KiB: its HTTP status (206 or 200 when there), and what it is.
rawvm_artifact_peek() {
    curl -s --retry 3 --retry-connrefused --retry-max-time 15 -r 0-1023 \
        -o "$rawvm_artifact_dir/head" \
        -w '%{http_code}' "$RAWVM_ARTIFACT_GET" 2>/dev/null || echo 000
}
rawvm_artifact_is_archive() {
    [ "$(head -c 2 "$rawvm_artifact_dir/head" | od -An -tx1 | tr -d ' \n')" = 1f8b ]
}
rawvm_artifact_unpack() {
    local staging="$rawvm_artifact_dir/unpacked" built_at pythons name
    if ! rawvm_artifact_is_archive; then
        log "warning: the environment's artifact is a failed build's note:" \
            "$(head -c 400 "$rawvm_artifact_dir/head" | tr -c '[:print:]' ' ')"
        return 1
    fi
    rm -rf "$staging" && mkdir -p "$staging" || return 1
    # Streamed: the download and the decompression overlap, and no archive sits on disk.
    curl -sf --retry 5 --retry-connrefused "$RAWVM_ARTIFACT_GET" \
        | tar -xzf - -C "$staging" 2>"$rawvm_artifact_dir/tar.err"
    if [ "${PIPESTATUS[0]}${PIPESTATUS[1]}" != 00 ]; then
        log "warning: the environment's artifact is corrupt or truncated" \
            "($(tail -c 300 "$rawvm_artifact_dir/tar.err" | tr -c '[:print:]' ' '))"
        return 1
    fi
    if [ ! -f "$staging/dask-rawvm-artifact" ] || [ ! -d "$staging/venv" ]; then
        log "warning: the environment's artifact lacks dask-rawvm-artifact or venv/"
        return 1
    fi
    built_at=$(sed -n 's/^venv=//p' "$staging/dask-rawvm-artifact")
    if [ -d "$staging/venv/conda" ] && [ "$built_at" != "$RAWVM_VENV" ]; then
        log "warning: the environment's artifact has conda packages, built at $built_at:" \
            "they do not move to $RAWVM_VENV"
        return 1
    fi
    if [ -z "$rawvm_python" ] && [ -d "$staging/python" ]; then
        # The uv-managed Python the builder downloaded, where uv keeps its own.
        pythons=$(rawvm_uv python dir 2>/dev/null) && mkdir -p "$pythons" || return 1
        for name in "$staging"/python/*; do
            [ -e "$pythons/${name##*/}" ] || mv "$name" "$pythons/" || return 1
            [ -x "$pythons/${name##*/}/bin/python$rawvm_minor" ] \
                && rawvm_python="$pythons/${name##*/}/bin/python$rawvm_minor"
        done
    fi
    if [ -z "$rawvm_python" ]; then
        log "warning: no Python $rawvm_minor here for the environment's artifact"
        return 1
    fi
    rm -rf "$RAWVM_VENV" && mv "$staging/venv" "$RAWVM_VENV" \
        && rawvm_uv venv --quiet --no-config --allow-existing --relocatable \
            --python "$rawvm_python" "$RAWVM_VENV" \
        && "$RAWVM_VENV/bin/python" -c "import distributed" \
        || { log "warning: the environment's artifact does not run here"; rm -rf "$RAWVM_VENV";
             return 1; }
    rm -rf "$staging"
}
rawvm_artifact_code=$(rawvm_artifact_peek)
case "$rawvm_artifact_code" in
404|403)  # none yet (S3 answers 403 for a missing key to whoever may not list the bucket)
    rawvm_artifact_claimed=$(printf '%s %s\n' "$INSTANCE_ID" "$rawvm_artifact_started" \
        | curl -s --retry 5 --retry-connrefused -o /dev/null -w '%{http_code}' -X PUT \
            -H 'If-None-Match: *' --data-binary @- "$RAWVM_ARTIFACT_CLAIM" 2>/dev/null)
    case "$rawvm_artifact_claimed" in
    200)
        RAWVM_ARTIFACT_STATE=builder
        log "building the environment's artifact for the other VMs" ;;
    412|409)
        log "another VM builds the environment: waiting for its artifact"
        rawvm_artifact_deadline=$((rawvm_artifact_started + RAWVM_ARTIFACT_WAIT))
        while [ "$(date +%s)" -lt "$rawvm_artifact_deadline" ]; do
            sleep $((RAWVM_ARTIFACT_POLL + RANDOM % 3))
            rawvm_artifact_code=$(rawvm_artifact_peek)
            case "$rawvm_artifact_code" in 200|206) break ;; esac
        done ;;
    *)
        log "warning: could not claim the environment's build (HTTP $rawvm_artifact_claimed)" ;;
    esac ;;
esac
case "$rawvm_artifact_code" in
200|206)
    rawvm_artifact_found=$(date +%s)
    if rawvm_artifact_unpack; then
        RAWVM_ARTIFACT_STATE=unpacked
        log "environment unpacked from its artifact in $(($(date +%s) - rawvm_artifact_found)) s" \
            "(after $((rawvm_artifact_found - rawvm_artifact_started)) s waiting for it)"
    else
        log "warning: installing the environment from the package index instead"
    fi ;;
*)
    if [ "$RAWVM_ARTIFACT_STATE" != builder ]; then
        log "warning: no artifact of the environment (HTTP $rawvm_artifact_code" \
            "after $(($(date +%s) - rawvm_artifact_started)) s):" \
            "installing it from the package index"
    fi ;;
esac
"""

_PUBLISH = r"""# dask-rawvm: publish the environment this VM built
# (dask_rawvm.environment.artifact).
# A note in the artifact's place tells the VMs waiting for it that the build failed.
rawvm_artifact_failed() {
    printf 'dask-rawvm: building this environment failed on %s: %s\n' "$INSTANCE_ID" "$1" \
        | curl -s --retry 5 --retry-connrefused -o /dev/null -X PUT -H 'If-None-Match: *' \
            -H 'Content-Type: text/plain' --data-binary @- "$RAWVM_ARTIFACT_PUT"
}
rawvm_artifact_publish() {
    local started staging archive home pythons name code size
    started=$(date +%s)
    staging="$rawvm_artifact_dir/pack"
    archive="$rawvm_artifact_dir/artifact.tar.gz"
    rm -rf "$staging" && mkdir -p "$staging/python" || return 1
    printf 'format=%s\ndigest=%s\npython=%s\nvenv=%s\nbuilt-by=%s\n' "$RAWVM_ARTIFACT_FORMAT" \
        "$RAWVM_BUNDLE_DIGEST" "$rawvm_python_version" "$RAWVM_VENV" "$INSTANCE_ID" \
        >"$staging/dask-rawvm-artifact"
    # A snapshot of hard links (no data copied): the Dask process now running from the venv
    # writes bytecode into it, which would change directories under tar's feet.
    cp -al "$RAWVM_VENV" "$staging/venv" || { rawvm_artifact_failed "no snapshot"; return 1; }
    # The venv's Python, when it is uv's managed one: the other VMs need not download it.
    home=$(sed -n 's/^home = //p' "$RAWVM_VENV/pyvenv.cfg")
    pythons=$(rawvm_uv python dir 2>/dev/null || true)
    case "$home" in
    "$pythons"/*)
        name=${home#"$pythons"/}; name=${name%%/*}
        cp -al "$pythons/$name" "$staging/python/$name" || return 1 ;;
    esac
    tar -C "$staging" -cf - --exclude=__pycache__ --exclude=.dask-rawvm-installed \
        dask-rawvm-artifact venv python 2>"$rawvm_artifact_dir/tar.err" | gzip -1 >"$archive"
    if [ "${PIPESTATUS[0]}${PIPESTATUS[1]}" != 00 ]; then
        rawvm_artifact_failed "packing the venv failed"
        log "warning: could not pack the environment's artifact" \
            "($(tail -c 300 "$rawvm_artifact_dir/tar.err" | tr -c '[:print:]' ' '))"
        rm -rf "$archive" "$staging"
        return 1
    fi
    size=$(($(stat -c %s "$archive") / 1048576))
    code=$(curl -s --retry 5 --retry-connrefused -o /dev/null -w '%{http_code}' \
        -H 'If-None-Match: *' -H 'Content-Type: application/gzip' -T "$archive" \
        "$RAWVM_ARTIFACT_PUT" 2>/dev/null)
    rm -rf "$archive" "$staging"
    case "$code" in
    200) log "published the environment's artifact ($size MiB) in $(($(date +%s) - started)) s" ;;
    412) log "the environment's artifact was published already" ;;
    *) rawvm_artifact_failed "uploading the artifact failed (HTTP $code)"
       log "warning: could not upload the environment's artifact (HTTP $code, $size MiB)" ;;
    esac
}
"""


def artifact_fetch_script() -> str:
    """The boot script's artifact step, before the install (bash).

    Needs ``RAWVM_ARTIFACT_GET``, ``RAWVM_ARTIFACT_PUT``, ``RAWVM_ARTIFACT_CLAIM`` (see
    :func:`artifact_settings`), ``RAWVM_ARTIFACT_WAIT``, ``RAWVM_ARTIFACT_POLL``,
    ``RAWVM_HOME``, ``RAWVM_VENV``, ``RAWVM_BUNDLE_DIGEST``, ``INSTANCE_ID``, the Python
    choice (``rawvm_python``, ``rawvm_minor``: :func:`~dask_rawvm.environment.bundle.
    python_script`), a ``rawvm_uv`` function and the boot script's ``log``. Sets
    ``RAWVM_ARTIFACT_STATE``: ``unpacked`` (the venv is ready), ``builder`` (install, then
    :func:`artifact_publish_script`'s ``rawvm_artifact_publish``) or ``none`` (install).
    """
    return _FETCH


def artifact_publish_script() -> str:
    """Defines ``rawvm_artifact_publish`` (pack the installed venv and upload it once) and
    ``rawvm_artifact_failed REASON`` (leave a note in the artifact's place, so the VMs
    waiting for it install at once); bash, for the builder after its install."""
    return _PUBLISH
