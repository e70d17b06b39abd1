"""Status event phases and conditions that one process reports and another reads."""

from __future__ import annotations

# The scheduler's event for a deployment it placed.
PLACEMENT = "placement"
# The provisioner's steps, each an event phase when it reports on its own.
VCLUSTER_READY = "vcluster_ready"
APP = "app"
ROLLOUT = "rollout"
ENDPOINT = "endpoint"
# A create's steps from the vCluster's readiness on, in order; the provisioner's plan is checked against it.
CREATE_FROM_VCLUSTER_READY = (VCLUSTER_READY, APP, ROLLOUT, ENDPOINT)
# The condition of a vCluster that answers; any later step's event may carry it.
VCLUSTER_READY_CONDITION = "VClusterReady"
