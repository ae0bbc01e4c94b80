"""Route solvers: swarm snapshot -> chain DAG -> Pareto front (exact, NSGA-II, Dijkstra) -> one chain.

Pure computation: no sockets, no torch, no printing, no config. See routing/SNAPSHOT.md for the
snapshot JSON format and routing/graph.py for the latency model.
"""

from .errors import NoRouteError, RoutingError
from .solve import OBJECTIVES, SOLVERS, SolveResult, solve
from .swarm import Hop, Route, ServerInfo, Snapshot

__all__ = ["Hop", "NoRouteError", "OBJECTIVES", "Route", "RoutingError", "SOLVERS", "ServerInfo",
           "Snapshot", "SolveResult", "solve"]
