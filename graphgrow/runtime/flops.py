"""Cost accounting in FLOPs per training sample (thesis Tables 4.2 and 4.4).

A training step costs a forward pass plus a backward pass; the backward pass of a layer costs
about twice its forward pass (gradients with respect to inputs and to weights), so one training
step per sample costs ``TRAIN_FACTOR`` x forward FLOPs. A sensitivity evaluation (graphgrow.sensli)
is one forward and backward pass of the current network (no optimizer step) plus, per candidate
layer, the products that give its merit-weight gradient from the activation and loss gradient at
its position (each op's ``parameter_gradient_flops`` rule), times the fraction of the training
data evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

TRAIN_FACTOR = 3


def training_flops(forward_flops: int) -> int:
    """FLOPs of one training step per sample for a network of ``forward_flops``."""
    return TRAIN_FACTOR * int(forward_flops)


def sensitivity_flops(forward_flops: int, candidate_flops: Iterable[int]) -> int:
    """FLOPs per evaluated sample of one sensitivity evaluation: a forward and backward pass of
    the network of ``forward_flops`` plus the merit-gradient FLOPs of every candidate."""
    return training_flops(forward_flops) + sum(int(f) for f in candidate_flops)


@dataclass
class CostLedger:
    """Accumulates FLOPs per training sample over a run: each epoch of training at the
    architecture of that epoch, plus every sensitivity evaluation."""
    training: int = 0
    sensitivity: int = 0
    epochs_by_architecture: dict[str, int] = field(default_factory=dict)

    def add_epoch(self, architecture: str, forward_flops: int, fraction: float = 1.0) -> None:
        self.training += round(training_flops(forward_flops) * fraction)
        self.epochs_by_architecture[architecture] = self.epochs_by_architecture.get(architecture, 0) + 1

    def add_sensitivity(self, flops_per_sample: int, fraction: float = 1.0) -> None:
        """One sensitivity evaluation of ``flops_per_sample`` (sensitivity_flops) on a
        ``fraction`` of the training data."""
        self.sensitivity += round(flops_per_sample * fraction)

    @property
    def total(self) -> int:
        return self.training + self.sensitivity

    def to_dict(self) -> dict:
        share = self.sensitivity / self.total if self.total else 0.0
        return {"total": self.total, "training": self.training, "sensitivity": self.sensitivity,
                "sensitivity_share": share, "epochs_by_architecture": dict(self.epochs_by_architecture)}
