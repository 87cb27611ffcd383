"""The embedded local cloud: moto's EC2 API plus a VM runtime that runs user-data locally."""

from dask_rawvm.localcloud.capacity import CapacityModel
from dask_rawvm.localcloud.server import CREDENTIALS, LocalCloud, RemoteCloud

__all__ = ["CREDENTIALS", "CapacityModel", "LocalCloud", "RemoteCloud"]
