"""Planning: profile the model, cost it on the hardware, decide per module."""
from ..plan import Fusion, Plan, PlanEntry, Prediction
from .planner import make_plan

__all__ = ["Fusion", "Plan", "PlanEntry", "Prediction", "make_plan"]
