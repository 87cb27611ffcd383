"""The VMs' side of data (dask_rawvm.data), without a cluster: the container-credentials
endpoint as botocore reads it, what a VM with credentials=None gets, and the launch of
credentials="role"."""

from __future__ import annotations

import datetime
import pickle
import socket
import urllib.error
import urllib.request

import botocore.credentials
import pytest
from dateutil.tz import tzutc

from dask_rawvm.config import resolve_options
from dask_rawvm.data import CredentialEndpoint, ForwardedCredentials, serve
from dask_rawvm.environment.bootstrap import worker_script
from dask_rawvm.machines import Settings
from dask_rawvm.providers import provider_for
from dask_rawvm.providers.ec2.fleet import template_data
from dask_rawvm.providers.ec2.provider import EC2Provider


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_botocore_reads_and_refreshes_what_the_endpoint_serves() -> None:
    url = f"http://127.0.0.1:{free_port()}/credentials"
    endpoint = CredentialEndpoint(url, "the-token")
    try:
        soon = datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(minutes=5)
        endpoint.update(ForwardedCredentials("AKIAFIRST", "secret-1", "token-1", soon))
        environ = {
            "AWS_CONTAINER_CREDENTIALS_FULL_URI": url,
            "AWS_CONTAINER_AUTHORIZATION_TOKEN": "the-token",
        }
        credentials = botocore.credentials.ContainerProvider(environ=environ).load()
        assert credentials.method == "container-role"
        first = credentials.get_frozen_credentials()
        assert (first.access_key, first.secret_key, first.token) == (
            "AKIAFIRST",
            "secret-1",
            "token-1",
        )
        # Within botocore's refresh window (5 min < 10 min): each use asks the endpoint again.
        endpoint.update(ForwardedCredentials("AKIASECOND", "secret-2", "token-2", soon))
        assert credentials.get_frozen_credentials().access_key == "AKIASECOND"
        # Another token is refused; the secret is not in the endpoint's repr of them.
        request = urllib.request.Request(url, headers={"Authorization": "wrong"})
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(request, timeout=5)
        assert "secret-2" not in repr(endpoint.credentials)
    finally:
        endpoint.server.shutdown()
        endpoint.server.server_close()


def test_without_forwarding_a_vm_gets_no_endpoint() -> None:
    assert not Settings(resolve_options(credentials=None)).forwards_credentials
    assert not Settings(resolve_options(tls=False)).forwards_credentials
    assert Settings(resolve_options()).forwards_credentials
    plain = worker_script("c", "tls://10.0.0.1:8786", "worker-", 0, 60)
    forwarding = worker_script(
        "c", "tls://10.0.0.1:8786", "worker-", 0, 60, credentials_endpoint=True
    )
    assert "RAWVM_CREDENTIALS_ENDPOINT=''" in plain
    assert "RAWVM_CREDENTIALS_ENDPOINT=yes" in forwarding
    # This process (no boot script set it up) serves nothing.
    later = datetime.datetime.now(datetime.timezone.utc)
    assert serve(ForwardedCredentials("AKIA", "s", None, later)) is False


def test_credentials_role_puts_the_named_profile_in_the_launch_template() -> None:
    options = resolve_options(credentials="role", iam_instance_profile="data-readers")
    provider = provider_for(options, "c")
    assert isinstance(provider, EC2Provider) and provider.instance_profile == "data-readers"
    assert not Settings(options).forwards_credentials
    by_name = template_data("c", user_data="#!/bin/sh\n", instance_profile="data-readers")
    assert by_name["IamInstanceProfile"] == {"Name": "data-readers"}
    arn = "arn:aws:iam::123456789012:instance-profile/data-readers"
    assert template_data("c", user_data="", instance_profile=arn)["IamInstanceProfile"] == {
        "Arn": arn
    }
    assert "IamInstanceProfile" not in template_data("c", user_data="")


def test_forwarded_credentials_unpickle_without_dateutil() -> None:
    """botocore's STS answer carries dateutil's tzutc; a VM environment without
    python-dateutil must still unpickle what the workers get."""
    expiry = datetime.datetime(2030, 1, 1, tzinfo=tzutc())
    credentials = ForwardedCredentials("AKIA", "secret", "token", expiry)
    assert credentials.expiration == expiry
    assert b"dateutil" not in pickle.dumps(credentials)
