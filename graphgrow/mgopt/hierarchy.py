"""The abstract hierarchy MG/Opt works on: parameter dicts and their arithmetic, the problem
and transfer interfaces, and the correction objective h."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

ParamDict = dict[str, torch.Tensor]


# -- arithmetic on parameter dicts ------------------------------------------------------------

def pd_add(x: ParamDict, y: ParamDict, scale: float = 1.0) -> ParamDict:
    """x + scale * y."""
    return {k: x[k] + scale * y[k] for k in x}


def pd_sub(x: ParamDict, y: ParamDict) -> ParamDict:
    return {k: x[k] - y[k] for k in x}


def pd_scale(x: ParamDict, scale: float) -> ParamDict:
    return {k: scale * v for k, v in x.items()}


def pd_dot(x: ParamDict, y: ParamDict) -> float:
    return float(sum((x[k] * y[k]).sum() for k in x))


def pd_sq_norm(x: ParamDict) -> float:
    return pd_dot(x, x)


def pd_clone(x: ParamDict) -> ParamDict:
    return {k: v.detach().clone() for k, v in x.items()}


# -- the problem interface --------------------------------------------------------------------

class Problem(Protocol):
    """One level: a stochastic objective on parameter dicts.

    ``draw_batch(generator)`` returns this level's own mini-batch; ``value_and_grad`` and
    ``value`` accept a batch drawn by this level *or by the next finer level* (the correction
    term evaluates the coarse gradient on the fine mini-batch). ``cost``: work units of one
    gradient evaluation on a batch of this level."""
    cost: float

    def draw_batch(self, generator: torch.Generator) -> Any: ...

    def value_and_grad(self, params: ParamDict, batch: Any) -> tuple[float, ParamDict]: ...

    def value(self, params: ParamDict, batch: Any) -> float: ...


class Transfer(Protocol):
    """Linear maps between a fine level and the next coarser one."""

    def restrict(self, fine: ParamDict) -> ParamDict: ...            # R_p

    def restrict_gradient(self, fine: ParamDict) -> ParamDict: ...   # R_g

    def prolong(self, coarse: ParamDict) -> ParamDict: ...           # P_p


class IdentityTransfer:
    """R_p = R_g = P = identity (Example 3.38: batch-size and resolution hierarchies)."""

    def restrict(self, fine: ParamDict) -> ParamDict:
        return dict(fine)

    restrict_gradient = restrict

    def prolong(self, coarse: ParamDict) -> ParamDict:
        return dict(coarse)


class MatrixTransfer:
    """Transfers of one flat parameter vector (key ``key``) by explicit matrices."""

    def __init__(self, restriction: torch.Tensor, prolongation: torch.Tensor,
                 gradient_restriction: torch.Tensor | None = None, key: str = "theta"):
        self.R_p = restriction
        self.P = prolongation
        self.R_g = restriction if gradient_restriction is None else gradient_restriction
        self.key = key

    def restrict(self, fine: ParamDict) -> ParamDict:
        return {self.key: self.R_p @ fine[self.key]}

    def restrict_gradient(self, fine: ParamDict) -> ParamDict:
        return {self.key: self.R_g @ fine[self.key]}

    def prolong(self, coarse: ParamDict) -> ParamDict:
        return {self.key: self.P @ coarse[self.key]}


@dataclass
class Hierarchy:
    """Levels (0 finest) and the transfers between level l and l+1."""
    levels: list
    transfers: list
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.levels) < 1 or len(self.transfers) != len(self.levels) - 1:
            raise ValueError(f"{len(self.levels)} levels need {len(self.levels) - 1} transfers, "
                             f"got {len(self.transfers)}")
        if not self.names:
            self.names = [f"level{l}" for l in range(len(self.levels))]

    def __len__(self) -> int:
        return len(self.levels)


# -- the correction objective h ---------------------------------------------------------------

@dataclass
class Shifted:
    """h(t) = f(t) + <v, t> + lam/2 ||t - anchor||^2 on one level (v, anchor None: h = f)."""
    problem: Any
    linear: ParamDict | None = None
    lam: float = 0.0
    anchor: ParamDict | None = None

    def _extra(self, params: ParamDict) -> float:
        value = 0.0
        if self.linear is not None:
            value += pd_dot(self.linear, params)
        if self.lam and self.anchor is not None:
            value += 0.5 * self.lam * pd_sq_norm(pd_sub(params, self.anchor))
        return value

    def value_and_grad(self, params: ParamDict, batch) -> tuple[float, ParamDict]:
        value, grad = self.problem.value_and_grad(params, batch)
        if self.linear is not None:
            grad = pd_add(grad, self.linear)
        if self.lam and self.anchor is not None:
            grad = pd_add(grad, pd_sub(params, self.anchor), self.lam)
        return value + self._extra(params), grad

    def value(self, params: ParamDict, batch) -> float:
        return self.problem.value(params, batch) + self._extra(params)


def correction_linear_term(transfer, coarse_problem, fine_grad: ParamDict, coarse_start: ParamDict,
                           batch) -> tuple[ParamDict, ParamDict]:
    """v = R_g g - grad f_H(R_p theta) on the fine mini-batch; returns (v, grad f_H(R_p theta))."""
    _, coarse_grad = coarse_problem.value_and_grad(coarse_start, batch)
    return pd_sub(transfer.restrict_gradient(fine_grad), coarse_grad), coarse_grad
