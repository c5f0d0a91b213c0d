"""Layer 4: training a compiled network. ``train`` (the trainer and its hooks), ``splits``
(tensors, batches, losses, evaluation), ``optimizers`` (built by name), ``data`` (spiral, MNIST,
npz), ``runlog`` (the run directory), ``plots``, ``flops`` (the cost ledger)."""
from .splits import Split, as_splits, evaluate, loss_fn
from .train import TrainConfig, Trainer, TrainResult, train

__all__ = ["Split", "TrainConfig", "TrainResult", "Trainer", "as_splits", "evaluate", "loss_fn", "train"]
