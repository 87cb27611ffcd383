"""EC2's vCPU quotas, served through Service Quotas as AWS serves them, for local-cloud accounts.

moto's Service Quotas knows only VPC quotas. A local cloud answers ``GetServiceQuota`` for
EC2's vCPU quotas from a table a test can change (:meth:`Quotas.set`), and
``GetAWSDefaultServiceQuota`` (which moto lacks) with AWS's defaults for a new account: the
fallback AWS documents for a quota with no applied value. Quotas are reported, not
enforced at launch.
"""

from __future__ import annotations

import threading
from typing import Any

#: EC2's running-instance vCPU quotas: code -> (name, AWS's default for a new account).
#: Codes and defaults from AWS's Service Quotas console and EC2 documentation (re-check:
#: AWS adjusts new-account defaults). The local cloud applies a generous 1152 vCPUs to
#: each by default, as an established account has.
EC2_VCPU_QUOTAS: dict[str, tuple[str, float]] = {
    "L-1216C47A": ("Running On-Demand Standard (A, C, D, H, I, M, R, T, Z) instances", 5.0),
    "L-34B43A08": ("All Standard (A, C, D, H, I, M, R, T, Z) Spot Instance Requests", 5.0),
    "L-DB2E81BA": ("Running On-Demand G and VT instances", 0.0),
    "L-3819A6DF": ("All G and VT Spot Instance Requests", 0.0),
    "L-417A185B": ("Running On-Demand P instances", 0.0),
    "L-7212CCBC": ("All P Spot Instance Requests", 0.0),
    "L-74FC7D96": ("Running On-Demand F instances", 0.0),
    "L-88CF9481": ("All F Spot Instance Requests", 0.0),
    "L-1945791B": ("Running On-Demand Inf instances", 0.0),
    "L-B5D1601B": ("All Inf Spot Instance Requests", 0.0),
    "L-7295265B": ("Running On-Demand X instances", 0.0),
    "L-E3A00192": ("All X Spot Instance Requests", 0.0),
    "L-2C3B7624": ("Running On-Demand Trn instances", 0.0),
    "L-6B0D517C": ("All Trn Spot Instance Requests", 0.0),
}
#: What a local cloud applies to each quota unless a test says otherwise.
APPLIED_DEFAULT = 1152.0

_QUOTAS: dict[str, Quotas] = {}
_LOCK = threading.Lock()
_HOOKED = False


class Quotas:
    """The applied EC2 vCPU quotas of one local cloud (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._applied: dict[str, float | None] = dict.fromkeys(EC2_VCPU_QUOTAS, APPLIED_DEFAULT)

    def set(self, quota_code: str, value: float | None) -> None:
        """Apply ``value`` vCPUs to a quota; None leaves it with no applied value (Service
        Quotas then answers ``NoSuchResourceException`` and callers fall back to the default).
        """
        if quota_code not in EC2_VCPU_QUOTAS:
            raise ValueError(
                f"{quota_code!r} is not one of EC2's vCPU quotas {sorted(EC2_VCPU_QUOTAS)}"
            )
        with self._lock:
            self._applied[quota_code] = value

    def applied(self, quota_code: str) -> float | None:
        with self._lock:
            return self._applied.get(quota_code)


def register(account_id: str, quotas: Quotas) -> None:
    """Serve ``quotas`` to the moto account ``account_id`` (installs the hooks once)."""
    _install_hooks()
    with _LOCK:
        _QUOTAS[account_id] = quotas


def unregister(account_id: str) -> None:
    with _LOCK:
        _QUOTAS.pop(account_id, None)


def _quota(code: str, value: float, region: str, account_id: str) -> dict[str, Any]:
    name, _ = EC2_VCPU_QUOTAS[code]
    return {
        "ServiceCode": "ec2",
        "ServiceName": "Amazon Elastic Compute Cloud (Amazon EC2)",
        "QuotaArn": f"arn:aws:servicequotas:{region}:{account_id}:ec2/{code}",
        "QuotaCode": code,
        "QuotaName": name,
        "Value": value,
        "Unit": "None",
        "Adjustable": True,
        "GlobalQuota": False,
    }


def _install_hooks() -> None:
    global _HOOKED
    with _LOCK:
        if _HOOKED:
            return
        import json

        from moto.servicequotas.exceptions import NoSuchResource
        from moto.servicequotas.models import ServiceQuotasBackend
        from moto.servicequotas.responses import ServiceQuotasResponse

        get_service_quota = ServiceQuotasBackend.get_service_quota

        def local(backend: Any, service_code: str, quota_code: str) -> bool:
            return service_code == "ec2" and backend.account_id in _QUOTAS

        def hooked_get_service_quota(
            backend: Any, service_code: str, quota_code: str
        ) -> dict[str, Any]:
            if not local(backend, service_code, quota_code):
                return get_service_quota(backend, service_code, quota_code)
            value = _QUOTAS[backend.account_id].applied(quota_code)
            if quota_code not in EC2_VCPU_QUOTAS or value is None:
                raise NoSuchResource
            return _quota(quota_code, value, backend.region_name, backend.account_id)

        def get_aws_default_service_quota(
            backend: Any, service_code: str, quota_code: str
        ) -> dict[str, Any]:
            if not local(backend, service_code, quota_code) or quota_code not in EC2_VCPU_QUOTAS:
                raise NoSuchResource
            default = EC2_VCPU_QUOTAS[quota_code][1]
            return _quota(quota_code, default, backend.region_name, backend.account_id)

        def respond_default(response: Any) -> str:
            params = json.loads(response.body)
            quota = response.backend.get_aws_default_service_quota(
                str(params.get("ServiceCode")), str(params.get("QuotaCode"))
            )
            return json.dumps({"Quota": quota})

        ServiceQuotasBackend.get_service_quota = hooked_get_service_quota  # type: ignore[method-assign,assignment]
        ServiceQuotasBackend.get_aws_default_service_quota = get_aws_default_service_quota  # type: ignore[attr-defined]
        ServiceQuotasResponse.get_aws_default_service_quota = respond_default  # type: ignore[attr-defined]
        _HOOKED = True
