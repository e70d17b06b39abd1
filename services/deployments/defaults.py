"""The API's defaults that its command line shows, in a module that imports nothing.

`apphosting provisioner`, `scheduler`, `updater` and `rest` build the same parser as `apphosting api`;
reading these numbers here keeps the API's code (SQLAlchemy, Alembic, gRPC, the validation models)
out of those processes' start-up. ApiOptions and Quotas take their defaults from here.
"""

from __future__ import annotations

# Resync: seconds without progress before a deployment's request is sent again, seconds between two
# looks, and how many times it is driven again before it ends in error (ApiOptions explains the choice).
STUCK_AFTER = 1200.0
RESYNC_INTERVAL = 60.0
MAX_REDRIVES = 3
# Seconds a new release may take to become healthy before it is rolled back by itself.
ROLLOUT_TIMEOUT = 600.0
# Seconds a deleted deployment's record and history are kept after its teardown ended (7 days).
DELETED_RETENTION = 7 * 24 * 3600.0

# Per-user quotas over live deployments (services/deployments/quotas.py).
QUOTA_DEPLOYMENTS = 100
QUOTA_CPU = 64.0
QUOTA_MEMORY_MB = 262_144
QUOTA_STORAGE_GB = 4_096
QUOTA_STORED_MB = 256
