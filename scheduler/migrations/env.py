"""Alembic environment of the scheduler."""

from apphosting.db import run_migrations
from scheduler.tables import Base

run_migrations(Base.metadata)
