"""RMNTR: the recursive multilevel proximal trust-region method (seed 002) for f + beta ||.||_1
on graphgrow width and depth hierarchies.

The folder: ``prox`` (the l1 term on every level, exact composite prox, restrictions with
R R^T = I), ``subproblem`` (Cauchy point, spectral prox-gradient model solver, acceptance and
radius rules), ``levels`` (flat objectives with exact HVPs, levels from ``passes``), ``method``
(the recursion), ``pinn`` (the PDE problem), ``plots``, ``run`` (the one-call engine).
"""
from .levels import AutogradObjective, Level, build_levels, network_objective, supervised_loss
from .method import RMNTR, Result, RMNTRConfig
from .pinn import PoissonPINN
from .prox import L1Term, Restriction, soft_threshold, stationarity
from .run import RMNTRRun, adam_warmup, l1_weights, make_problem, run

__all__ = ["AutogradObjective", "L1Term", "Level", "PoissonPINN", "RMNTR", "RMNTRConfig", "RMNTRRun", "Restriction",
           "Result", "adam_warmup", "build_levels", "l1_weights", "make_problem", "network_objective", "run",
           "soft_threshold", "stationarity", "supervised_loss"]
