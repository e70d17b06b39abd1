"""Provisioner workers: reconcile ProvisionJobs into vClusters and apps through a cluster driver."""

from provisioner.driver import (
    Driver,
    PermanentError,
    StepOutcome,
    StepResult,
    TemporaryError,
    app_name,
    deployment_key,
    host_namespace_name,
    vcluster_name,
)
from provisioner.reconcile import (
    CREATE_STEPS,
    DELETE_STEPS,
    DELETED_PHASE,
    Emit,
    Heartbeat,
    Reconciler,
    RetryPolicy,
    Sleep,
    event_id,
)
from provisioner.simulated import FAIL_PERMANENT_MARK, FAIL_TEMPORARY_MARK, SimulatedDriver

__all__ = [
    "CREATE_STEPS",
    "DELETED_PHASE",
    "DELETE_STEPS",
    "FAIL_PERMANENT_MARK",
    "FAIL_TEMPORARY_MARK",
    "Driver",
    "Emit",
    "Heartbeat",
    "PermanentError",
    "Reconciler",
    "RetryPolicy",
    "SimulatedDriver",
    "Sleep",
    "StepOutcome",
    "StepResult",
    "TemporaryError",
    "app_name",
    "deployment_key",
    "event_id",
    "host_namespace_name",
    "vcluster_name",
]
