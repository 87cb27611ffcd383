"""How an EC2 machine's boot script learns who it is: the instance metadata service (IMDSv2).

The metadata prelude of the bootstrap (see
:data:`dask_rawvm.environment.bootstrap.IDENTITY_FROM_VARIABLES` for what a prelude
provides). It reads the metadata service at ``$RAWVM_IMDS``, which the local cloud sets
and EC2 leaves unset (so it is ``169.254.169.254``), with a session token as IMDSv2
requires (launch templates set ``HttpTokens=required``).

A token lives at most 6 hours (AWS's IMDSv2 documentation), and the spot watcher
(``interruption_notice``, polled every few seconds for the worker's whole life) outlives
it: every read renews the token once it is nine tenths through its life, and once more
when the service answers 401 (the token expired sooner than the clock said, or the service
restarted). Nothing reads instance tags from the metadata service: launch templates
leave ``InstanceMetadataTags`` off, so EC2 takes tag keys with spaces and ``/``.
"""

from __future__ import annotations

#: Seconds an IMDSv2 token is asked for: EC2's maximum.
IMDS_TOKEN_TTL = 21600

IMDS_PRELUDE = rf"""
IMDS="${{RAWVM_IMDS:-http://169.254.169.254}}"
IMDS_TOKEN_TTL={IMDS_TOKEN_TTL}
imds_token() {{
    TOKEN=$(curl -sf --retry 10 --retry-connrefused -X PUT \
        -H "X-aws-ec2-metadata-token-ttl-seconds: $IMDS_TOKEN_TTL" "$IMDS/latest/api/token")
    TOKEN_AT=$(date +%s)
}}
# Prints a metadata value; fails when there is none (404) or no token is accepted.
meta() {{
    [ $(( $(date +%s) - ${{TOKEN_AT:-0}} )) -lt $(( IMDS_TOKEN_TTL * 9 / 10 )) ] || imds_token
    local answer code=000
    for _ in 1 2; do
        answer=$(curl -s --retry 5 -w '\n%{{http_code}}' \
            -H "X-aws-ec2-metadata-token: ${{TOKEN:-}}" "$IMDS/latest/meta-data/$1")
        code=${{answer##*$'\n'}}
        [ "$code" = 401 ] || break
        imds_token
    done
    [ "$code" = 200 ] && printf '%s\n' "${{answer%$'\n'*}}"
}}
imds_token
INSTANCE_ID=$(meta instance-id)
ADDRESS=$(meta local-ipv4)
[ -n "$ADDRESS" ] || {{ log "no instance metadata at $IMDS"; poweroff_vm 1; }}
launch_index() {{ meta ami-launch-index; }}
# EC2 gives a spot instance two minutes' notice before taking it back.
interruption_notice() {{ meta spot/instance-action >/dev/null 2>&1; }}
"""
