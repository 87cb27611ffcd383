"""The machine images the local cloud publishes the way AWS does, by public SSM parameter.

moto publishes Amazon Linux's parameters, not those of AWS's Deep Learning images. A
local VM is a process on this machine whatever its image, so the "GPU image" of an
architecture is that architecture's Amazon Linux 2023 image under the parameter name
AWS uses (``/aws/service/deeplearning/ami/{arch}/...``): GPU types then launch through
the same code as on EC2.
"""

from __future__ import annotations

from moto.core.utils import utcnow

# The SSM parameters AWS publishes its images under. The local cloud imitates AWS and
# imports nothing of its clients, so it states them itself; the EC2 provider asks for the
# same names (tests/localcloud/test_localcloud.py holds the two together).
AMI_PARAMETER = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-{arch}"
GPU_AMI_PARAMETER = (
    "/aws/service/deeplearning/ami/{arch}/base-oss-nvidia-driver-gpu-amazon-linux-2023/"
    "latest/ami-id"
)

ARCHITECTURES = ("x86_64", "arm64")


def publish_gpu_images(account_id: str, region: str) -> None:
    """Publish the GPU image parameters of ``region`` in the account ``account_id``."""
    from moto.ssm.models import Parameter, ssm_backends

    backend = ssm_backends[account_id][region]
    for arch in ARCHITECTURES:
        base = backend.get_parameter(AMI_PARAMETER.format(arch=arch))
        if base is None:  # a region moto has no images for
            continue
        name = GPU_AMI_PARAMETER.format(arch=arch)
        backend._parameters[name] = [  # moto keeps every version, newest last
            Parameter(  # type: ignore[abstract]
                account_id=account_id,
                name=name,
                value=base.value,
                parameter_type="String",
                description=None,
                allowed_pattern=None,
                keyid=None,
                last_modified_date=utcnow(),
                version=1,
                data_type="aws:ec2:image",
            )
        ]
