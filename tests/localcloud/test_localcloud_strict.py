"""The local cloud as strict as EC2, switch by switch, over HTTP: eventual consistency,
paged listings, no default VPC, denied actions, Service Quotas, expiring IMDSv2 tokens, and
the same switches on a cloud in another process (RemoteCloud)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from helpers import standalone_cloud, wait_for

from dask_rawvm.localcloud import LocalCloud

NO_RETRIES = Config(retries={"total_max_attempts": 1}, s3={"addressing_style": "path"})


@pytest.fixture
def idle_cloud() -> Iterator[LocalCloud]:
    with LocalCloud(boot_delay=3600) as cloud:
        yield cloud


def client(cloud: Any, service: str = "ec2") -> Any:
    return boto3.client(service, config=NO_RETRIES, **cloud.client_kwargs())


def code(error: pytest.ExceptionInfo[ClientError]) -> str:
    return str(error.value.response["Error"]["Code"])


def default_vpc(ec2: Any) -> str:
    return str(ec2.describe_vpcs()["Vpcs"][0]["VpcId"])


def test_what_was_just_made_is_not_found_for_the_next_calls_naming_it(
    idle_cloud: LocalCloud,
) -> None:
    ec2 = client(idle_cloud)
    idle_cloud.eventual_consistency(calls=2)
    group = ec2.create_security_group(GroupName="g", Description="g", VpcId=default_vpc(ec2))
    for _ in range(2):
        with pytest.raises(ClientError) as missing:
            ec2.authorize_security_group_ingress(
                GroupId=group["GroupId"],
                IpPermissions=[{"IpProtocol": "-1", "IpRanges": [{"CidrIp": "10.0.0.0/8"}]}],
            )
        assert code(missing) == "InvalidGroup.NotFound"
    assert ec2.describe_security_groups(GroupIds=[group["GroupId"]])["SecurityGroups"]

    (instance,) = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"]
    with pytest.raises(ClientError) as missing:
        ec2.describe_instances(InstanceIds=[instance["InstanceId"]])
    assert code(missing) == "InvalidInstanceID.NotFound"
    with pytest.raises(ClientError):
        ec2.get_console_output(InstanceId=instance["InstanceId"])
    ec2.terminate_instances(InstanceIds=[instance["InstanceId"]])  # seen by the third call

    template = ec2.create_launch_template(
        LaunchTemplateName="t", LaunchTemplateData={"UserData": ""}
    )["LaunchTemplate"]["LaunchTemplateId"]
    with pytest.raises(ClientError) as missing:
        ec2.create_launch_template_version(LaunchTemplateId=template, LaunchTemplateData={})
    assert code(missing) == "InvalidLaunchTemplateId.NotFound"
    # What existed before the switch, and what is named by filters, are seen at once.
    assert ec2.describe_security_groups(GroupNames=["default"])["SecurityGroups"]
    idle_cloud.eventual_consistency(0)
    fresh = ec2.create_security_group(GroupName="h", Description="h", VpcId=default_vpc(ec2))
    assert ec2.describe_security_groups(GroupIds=[fresh["GroupId"]])["SecurityGroups"]


def test_listings_come_in_pages_that_add_up_to_the_whole(idle_cloud: LocalCloud) -> None:
    ec2, s3 = client(idle_cloud), client(idle_cloud, "s3")
    vpc = default_vpc(ec2)
    for n in range(5):
        ec2.create_security_group(GroupName=f"g{n}", Description="g", VpcId=vpc)
        s3.create_bucket(Bucket=f"bucket-{n}")
    whole = {g["GroupId"] for g in ec2.describe_security_groups()["SecurityGroups"]}
    idle_cloud.paginate(page_size=2)
    first = ec2.describe_security_groups()
    assert len(first["SecurityGroups"]) == 2 and first["NextToken"]
    pages = list(ec2.get_paginator("describe_security_groups").paginate())
    assert len(pages) == 3
    assert {g["GroupId"] for p in pages for g in p["SecurityGroups"]} == whole
    buckets = s3.list_buckets()
    assert len(buckets["Buckets"]) == 2 and buckets["ContinuationToken"]
    listed = [b["Name"] for p in s3.get_paginator("list_buckets").paginate() for b in p["Buckets"]]
    assert sorted(listed) == [f"bucket-{n}" for n in range(5)]
    idle_cloud.paginate(None)
    assert "NextToken" not in ec2.describe_security_groups()


def test_an_account_without_a_default_vpc(idle_cloud: LocalCloud) -> None:
    ec2 = client(idle_cloud)
    vpc = idle_cloud.remove_default_vpc()
    assert ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"] == []
    default = [{"Name": "default-for-az", "Values": ["true"]}]
    assert ec2.describe_subnets(Filters=default)["Subnets"] == []
    # The VPC itself stays, an ordinary one with its subnets.
    assert ec2.describe_subnets(Filters=[{"Name": "vpc-id", "Values": [vpc]}])["Subnets"]


def test_a_denied_action_answers_as_ec2_does(idle_cloud: LocalCloud) -> None:
    ec2 = client(idle_cloud)
    (instance,) = ec2.run_instances(ImageId="ami-12c6146b", MinCount=1, MaxCount=1)["Instances"]
    idle_cloud.deny("GetConsoleOutput")
    with pytest.raises(ClientError) as denied:
        ec2.get_console_output(InstanceId=instance["InstanceId"])
    assert code(denied) == "UnauthorizedOperation"
    assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    idle_cloud.deny("GetConsoleOutput", False)
    ec2.get_console_output(InstanceId=instance["InstanceId"])


def test_ec2_vcpu_quotas_through_service_quotas(idle_cloud: LocalCloud) -> None:
    quotas = client(idle_cloud, "service-quotas")
    standard = quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-1216C47A")["Quota"]
    assert standard["Value"] == 1152 and "Standard" in standard["QuotaName"]
    idle_cloud.set_quota("L-34B43A08", 16)
    spot = quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-34B43A08")["Quota"]
    assert spot["Value"] == 16
    idle_cloud.set_quota("L-34B43A08", None)  # no applied value: AWS's default is the fallback
    with pytest.raises(ClientError) as missing:
        quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-34B43A08")
    assert code(missing) == "NoSuchResourceException"
    default = quotas.get_aws_default_service_quota(ServiceCode="ec2", QuotaCode="L-34B43A08")
    assert default["Quota"]["Value"] == 5


# A boot script that reads its metadata with a token, outlives it, and reports each answer.
TOKENS = r"""#!/bin/bash
IMDS="$RAWVM_IMDS"
code() { curl -s -o /dev/null -w '%{http_code}' "$@"; }
get() { code -H "X-aws-ec2-metadata-token: $1" "$IMDS/latest/meta-data/$2"; }
put() { code -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: $1" "$IMDS/latest/api/token"; }
TOKEN=$(curl -sf -X PUT -H "X-aws-ec2-metadata-token-ttl-seconds: 21600" "$IMDS/latest/api/token")
echo "fresh=$(get "$TOKEN" instance-id)"
echo "tags=$(get "$TOKEN" tags/instance)"
sleep 2
echo "expired=$(get "$TOKEN" instance-id)"
echo "ttl0=$(put 0) ttl21601=$(put 21601) ttl60=$(put 60)"
sleep 300
"""


def test_imds_tokens_expire_and_tags_need_metadata_tags_enabled(cloud: LocalCloud) -> None:
    cloud.imds_token_ttl(1.0)
    ec2 = client(cloud)
    (instance,) = ec2.run_instances(
        ImageId="ami-12c6146b",
        MinCount=1,
        MaxCount=1,
        UserData=TOKENS,
        MetadataOptions={"HttpTokens": "required", "InstanceMetadataTags": "disabled"},
    )["Instances"]
    iid = instance["InstanceId"]
    wait_for(lambda: "ttl60=" in cloud.console_output(iid), 30, "the token script")
    output = cloud.console_output(iid)
    assert "fresh=200" in output
    assert "tags=404" in output  # InstanceMetadataTags disabled: no tags, as on EC2
    assert "expired=401" in output
    assert "ttl0=400 ttl21601=400 ttl60=200" in output


def test_a_cloud_in_another_process_takes_the_same_switches() -> None:
    with standalone_cloud() as remote:
        ec2 = client(remote)
        vpc = remote.strict(consistency_calls=1, imds_token_ttl=5, page_size=1)
        assert vpc is not None
        assert ec2.describe_vpcs(Filters=[{"Name": "is-default", "Values": ["true"]}])["Vpcs"] == []
        group = ec2.create_security_group(GroupName="g", Description="g", VpcId=vpc)["GroupId"]
        with pytest.raises(ClientError, match=r"InvalidGroup\.NotFound"):
            ec2.describe_security_groups(GroupIds=[group])
        assert "NextToken" in ec2.describe_security_groups()
        with pytest.raises(ClientError, match="UnauthorizedOperation"):
            ec2.get_console_output(InstanceId="i-0123456789abcdef0")
        remote.set_quota("L-1216C47A", 8)
        quotas = client(remote, "service-quotas")
        assert (
            quotas.get_service_quota(ServiceCode="ec2", QuotaCode="L-1216C47A")["Quota"]["Value"]
            == 8
        )
        remote.refuse_spot_service_linked_role(False)
        remote.deny("GetConsoleOutput", False)
        remote.eventual_consistency(0)
        assert ec2.describe_security_groups(GroupIds=[group])["SecurityGroups"]
