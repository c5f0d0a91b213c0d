"""Stochastic multilevel optimisation (MG/Opt, thesis Sections 2.4 and 3) as an engine.

The folder: ``hierarchy`` (parameter dicts, the problem and transfer interfaces, the correction
objective), ``optimizer`` (Algorithm 5, V-cycles, the variants), ``network`` (levels built from a
network by the passes), ``flat`` (a level's parameters as one vector, transfers compiled to
gathers on it), ``quadratic`` (the model problem of Section 3), ``run`` (the one-call
engine the CLI calls).
"""
from .hierarchy import (Hierarchy, IdentityTransfer, MatrixTransfer, ParamDict, Problem, Shifted, Transfer,
                        correction_linear_term, pd_add, pd_clone, pd_dot, pd_scale, pd_sq_norm, pd_sub)
from .config import SCHEDULES, VARIANTS, MGOptConfig
from .optimizer import FORWARD_SHARE, MultilevelOptimizer, StepInfo, nested_schedule, optimize, prolong_from
from .run import MGOptResult, run

__all__ = ["FORWARD_SHARE", "Hierarchy", "IdentityTransfer", "MGOptConfig", "MGOptResult", "MatrixTransfer",
           "MultilevelOptimizer", "ParamDict", "Problem", "SCHEDULES", "Shifted", "StepInfo", "Transfer",
           "VARIANTS", "correction_linear_term", "nested_schedule", "optimize", "pd_add", "pd_clone", "pd_dot",
           "pd_scale", "pd_sq_norm", "pd_sub", "prolong_from", "run"]
