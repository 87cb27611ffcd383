"""How an EC2 machine's boot script learns who it is: the instance metadata service (IMDSv2).

The metadata prelude of the bootstrap (see
:data:`dask_rawvm.environment.bootstrap.IDENTITY_FROM_VARIABLES` for what a prelude
provides). It reads the metadata service at ``$RAWVM_IMDS``, which the local cloud sets
and EC2 leaves unset (so it is ``169.254.169.254``), with a session token as IMDSv2
requires (launch templates set ``HttpTokens=required``).
"""

from __future__ import annotations

IMDS_PRELUDE = r"""
IMDS="${RAWVM_IMDS:-http://169.254.169.254}"
TOKEN=$(curl -sf --retry 10 --retry-connrefused -X PUT \
    -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" "$IMDS/latest/api/token")
meta() { curl -sf --retry 5 -H "X-aws-ec2-metadata-token: ${TOKEN:-}" "$IMDS/latest/meta-data/$1"; }
INSTANCE_ID=$(meta instance-id)
ADDRESS=$(meta local-ipv4)
[ -n "$ADDRESS" ] || { log "no instance metadata at $IMDS"; poweroff_vm 1; }
launch_index() { meta ami-launch-index; }
# EC2 gives a spot instance two minutes' notice before taking it back.
interruption_notice() { meta spot/instance-action >/dev/null 2>&1; }
"""
