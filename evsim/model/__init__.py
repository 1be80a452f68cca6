"""The SimPy model: vehicles, stations and company servers driven by the pure policies."""

from evsim.model.simulation import Simulation, SimResult

__all__ = ["SimResult", "Simulation"]
