"""The embedded local cloud: moto's EC2 API plus a VM runtime that runs user-data locally."""

from dask_rawvm.localcloud.capacity import CapacityModel
from dask_rawvm.localcloud.server import CREDENTIALS, LocalCloud, RemoteCloud
from dask_rawvm.localcloud.vmimage import IMAGES, Image, Isolation

__all__ = [
    "CREDENTIALS",
    "IMAGES",
    "CapacityModel",
    "Image",
    "Isolation",
    "LocalCloud",
    "RemoteCloud",
]
