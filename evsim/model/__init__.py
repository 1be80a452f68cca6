"""The SimPy model: vehicles, stations and company servers driven by the pure policies."""

from evsim.model.simulation import SimResult, Simulation

__all__ = ["SimResult", "Simulation"]
