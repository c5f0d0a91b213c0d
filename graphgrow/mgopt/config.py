"""Settings of the multilevel methods (MG/Opt, graphgrow.mgopt.optimizer), checked on creation."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

from ..errors import GraphgrowError

VARIANTS = ("mgopt", "no-correction", "nested")
SCHEDULES = ("constant", "diminishing")


@dataclass
class MGOptConfig:
    """Settings of the multilevel methods (names follow the thesis).

    alpha: fine SGD rate; alpha_bar: SGD rate on coarse levels (None: alpha); alpha_cgc: step
    along the prolonged correction; kappa: correction when ||R_g g||^2 > kappa ||g||^2; K: SGD
    steps on the coarsest level per correction; lam: regularisation of h; pre_smooth /
    post_smooth: SGD steps on intermediate levels of a V-cycle before / after their own
    correction; min_gap: fine SGD steps required between corrections (1 = Algorithm 5's "no
    correction at k-1"; 0 = a V-cycle every iteration: fine SGD step, then the correction);
    same_batch: every level of a correction reuses the fine mini-batch; momentum: heavy-ball
    momentum on every level; descent_check: reject corrections with <g, e> >= 0; backtracking:
    maximal halvings of alpha_cgc under the Armijo condition (0: no Armijo check); schedule: constant, or
    diminishing (alpha_k = alpha / (1 + k / decay), the same for alpha_cgc; Robbins-Monro);
    nested_iterations: SGD iterations on each coarse level before prolonging (variant nested).
    """
    alpha: float = 0.1
    alpha_bar: float | None = None
    alpha_cgc: float = 1.0
    kappa: float = 0.5
    K: int = 10
    lam: float = 0.0
    variant: str = "mgopt"
    pre_smooth: int = 1
    post_smooth: int = 1
    min_gap: int = 1
    same_batch: bool = False
    momentum: float = 0.0
    descent_check: bool = True
    backtracking: int = 0
    armijo: float = 1e-4
    schedule: str = "constant"
    decay: float = 100.0
    nested_iterations: int | Sequence[int] = 0

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        def bad(option, message, hint=None):
            raise GraphgrowError(f"mgopt setting: {message}", option=option, hint=hint)
        if self.variant not in VARIANTS:
            bad("variant", f"unknown variant '{self.variant}'", f"use one of {', '.join(VARIANTS)}")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"unknown step-size schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        for name in ("alpha", "alpha_cgc", "decay"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and value > 0 and math.isfinite(value)):
                bad(name, f"{name} must be a positive number, got {value!r}")
        if self.alpha_bar is not None and not self.alpha_bar > 0:
            bad("alpha_bar", f"alpha_bar must be positive, got {self.alpha_bar!r}")
        if not 0 <= self.kappa < 1:
            bad("kappa", f"kappa must lie in [0, 1), got {self.kappa!r}",
                "the rule ||R_g g||^2 > kappa ||g||^2 compares a restricted gradient with the full one")
        if not (isinstance(self.K, int) and self.K >= 1):
            bad("K", f"K must be a positive integer, got {self.K!r}")
        if self.lam < 0:
            bad("lam", f"lam must not be negative, got {self.lam!r}")
        for name in ("pre_smooth", "post_smooth", "backtracking"):
            if not (isinstance(getattr(self, name), int) and getattr(self, name) >= 0):
                bad(name, f"{name} must be a non-negative integer, got {getattr(self, name)!r}")
        if not (isinstance(self.min_gap, int) and self.min_gap >= 0):
            bad("min_gap", f"min_gap must be a non-negative integer, got {self.min_gap!r}",
                "1 is Algorithm 5 (no corrections in consecutive iterations), 0 a V-cycle every iteration")
        if not (isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1):
            bad("momentum", f"momentum must lie in [0, 1), got {self.momentum!r}")

    @property
    def coarse_rate(self) -> float:
        return self.alpha if self.alpha_bar is None else self.alpha_bar

    def rate(self, base: float, iteration: int) -> float:
        return base if self.schedule == "constant" else base / (1.0 + iteration / self.decay)

    def to_dict(self) -> dict:
        values = asdict(self)
        if not isinstance(values["nested_iterations"], int):
            values["nested_iterations"] = list(values["nested_iterations"])
        return values
