"""The scheduler: places deployments on locations and holds their capacity in its ledger."""

from scheduler.ledger import Ledger
from scheduler.placement import Demand, Placed, Placement, Placer, Refused, demand_of, place

__all__ = ["Demand", "Ledger", "Placed", "Placement", "Placer", "Refused", "demand_of", "place"]
