"""dask_rawvm: Dask clusters on raw VMs, fast and safe."""

from dask_rawvm import config as _config  # noqa: F401  (installs rawvm.yaml into dask's config)
from dask_rawvm.cluster import RawVMAdaptive, RawVMCluster
from dask_rawvm.localcloud import LocalCloud
from dask_rawvm.providers.base import ProviderError

__version__ = "0.1.0"
__all__ = ["LocalCloud", "ProviderError", "RawVMAdaptive", "RawVMCluster", "__version__"]
