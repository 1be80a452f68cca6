"""evsim: a lab for EV charging networks.

The same pure policies and protocol drive a SimPy simulation and a live network of company
servers. Quick start::

    import evsim
    sc = evsim.load_scenario()              # the default Bahia scenario
    res = evsim.simulate(sc, policy="least_wait", seed=1)
    res.metrics["wait_min"], res.trace.head()
    evsim.compare(sc, ["nearest", "least_wait", "balanced"], seeds=3).summary
"""

from evsim.api import CompareResult, compare, simulate
from evsim.metrics import compute_metrics
from evsim.policies import POLICIES, resolve
from evsim.scenario import Scenario, ScenarioError, load_scenario
from evsim.trace import read_trace

__all__ = [
    "POLICIES",
    "CompareResult",
    "Scenario",
    "ScenarioError",
    "compare",
    "compute_metrics",
    "load_scenario",
    "read_trace",
    "resolve",
    "simulate",
]
__version__ = "0.1.0"
