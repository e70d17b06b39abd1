"""Alembic environment of the deployment service."""

from apphosting.db import run_migrations
from services.deployments.tables import Base

run_migrations(Base.metadata)
