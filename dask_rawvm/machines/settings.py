"""The options one cluster runs with: one holder, read by every part of it."""

from __future__ import annotations

import dataclasses

from dask_rawvm.config import ClusterOptions


class Settings:
    """The cluster's :class:`~dask_rawvm.config.ClusterOptions`, held in one place.

    Resolved once from the keywords and the config; the one change ever made is the
    worker types preflight chose (:meth:`use_worker_types`), which every part then sees.
    """

    def __init__(self, options: ClusterOptions) -> None:
        self._options = options

    @property
    def options(self) -> ClusterOptions:
        return self._options

    @property
    def scheme(self) -> str:
        """The scheme of every Dask address of the cluster."""
        return "tls" if self._options.tls else "tcp"

    @property
    def forwards_credentials(self) -> bool:
        """Whether the VMs get this client's AWS identity (``credentials="forward"``): only
        over TLS, the one connection credentials may travel on."""
        return self._options.credentials == "forward" and self._options.tls

    def use_worker_types(self, candidates: list[str]) -> None:
        """Launch workers on ``candidates``, best first (chosen or checked by preflight)."""
        self._options = dataclasses.replace(
            self._options, worker_vm_type=candidates[0], worker_vm_types=list(candidates)
        )
