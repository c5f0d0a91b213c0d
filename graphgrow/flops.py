"""Cost accounting in FLOPs per training sample (thesis Tables 4.2 and 4.4).

A training step costs a forward pass plus a backward pass; the backward pass of a layer costs
about twice its forward pass (gradients with respect to inputs and to weights), so one training
step per sample costs ``TRAIN_FACTOR`` x forward FLOPs. The sensitivity evaluation is one
forward and backward pass of the fully-extended network (no optimizer step) over the data it
uses, so it costs the same factor times the extended network's forward FLOPs, times the
fraction of the training data evaluated.
"""
from __future__ import annotations

from dataclasses import dataclass, field

TRAIN_FACTOR = 3


def training_flops(forward_flops: int) -> int:
    """FLOPs of one training step per sample for a network of ``forward_flops``."""
    return TRAIN_FACTOR * int(forward_flops)


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

    def add_sensitivity(self, extended_forward_flops: int, fraction: float = 1.0) -> None:
        self.sensitivity += round(training_flops(extended_forward_flops) * fraction)

    @property
    def total(self) -> int:
        return self.training + self.sensitivity

    def to_dict(self) -> dict:
        share = self.sensitivity / self.total if self.total else 0.0
        return {"total": self.total, "training": self.training, "sensitivity": self.sensitivity,
                "sensitivity_share": share, "epochs_by_architecture": dict(self.epochs_by_architecture)}
