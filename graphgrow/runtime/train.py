"""The training runtime: trains a compiled ``Network`` on a data set.

``train(network, data, TrainConfig(...))`` is the one-call form; ``Trainer`` is the object the
growth (SensLI) and multilevel engines plug into through hooks. A hook is any object with some
of the methods ``on_train_start(trainer)``, ``on_epoch_start(trainer)``, ``on_step_end(trainer,
record)``, ``on_epoch_end(trainer)``, ``on_train_end(trainer)``; a hook may replace the network
with ``trainer.replace_network`` (which carries the optimizer state over).

Randomness (mini-batch order) comes from ``TrainConfig.seed`` only: same seed, same run.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Sequence

import torch

import passes

from ..compiler.network import Network
from ..errors import GraphgrowError
from .optimizers import make_optimizer, optimizer_kind
from .runlog import RunLog
from .splits import LOSSES, as_splits, batches, check_data_fits, error_count, evaluate, loss_fn, place

SCHEDULES = ("constant", "step", "exponential", "cosine")


@dataclass
class TrainConfig:
    """How to train. ``batch=None`` is full batch. ``iterations`` (optimizer steps), when
    given, ends training before ``epochs`` does. LR schedules are per epoch:
    step: lr * gamma**(epoch // step_size); exponential: lr * gamma**epoch;
    cosine: lr * (1 + cos(pi * epoch / epochs)) / 2. ``optimizer="frobenius"`` is SGD with the
    Frobenius-type layer-wise preconditioner (graphgrow.precond, per-batch estimates) with
    ``damping`` as both γ1 and γ2."""
    epochs: int = 10
    lr: float = 0.1
    optimizer: str = "sgd"
    momentum: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: tuple[float, float] = (0.9, 0.999)
    damping: float = 0.01
    batch: int | None = None
    loss: str = "cross_entropy"
    schedule: str = "constant"
    step_size: int = 30
    gamma: float = 0.1
    iterations: int | None = None
    seed: int = 0
    eval_every: int = 1
    log_steps: bool = True
    progress: bool = False

    def __post_init__(self):
        self.check()

    def check(self) -> None:
        def bad(option, message, hint=None):
            raise GraphgrowError(f"training setting: {message}", option=option, hint=hint)
        if self.loss not in LOSSES:
            bad("loss", f"unknown loss '{self.loss}'", f"use one of {', '.join(LOSSES)}")
        misfit = optimizer_kind(self.optimizer).misfit(self)
        if misfit:
            bad("optimizer", *misfit)
        if self.schedule not in SCHEDULES:
            bad("schedule", f"unknown LR schedule '{self.schedule}'", f"use one of {', '.join(SCHEDULES)}")
        if not (isinstance(self.epochs, int) and self.epochs >= 0):
            bad("epochs", f"epochs must be a non-negative integer, got {self.epochs!r}")
        if self.iterations is not None and not (isinstance(self.iterations, int) and self.iterations >= 0):
            bad("iterations", f"iterations must be a non-negative integer, got {self.iterations!r}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            bad("lr", f"lr must be positive, got {self.lr!r}")
        if self.batch is not None and not (isinstance(self.batch, int) and self.batch >= 1):
            bad("batch", f"batch must be a positive integer or None (full batch), got {self.batch!r}")
        if not (self.momentum >= 0 and math.isfinite(self.momentum)):
            bad("momentum", f"momentum must be a non-negative number, got {self.momentum!r}")
        if not (self.weight_decay >= 0 and math.isfinite(self.weight_decay)):
            bad("weight_decay", f"weight decay must be a non-negative number, got {self.weight_decay!r}")
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            bad("damping", f"damping must be a non-negative number, got {self.damping!r}")
        if self.eval_every < 1:
            bad("eval_every", f"eval_every must be at least 1, got {self.eval_every}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise GraphgrowError(f"unknown training setting(s): {', '.join(sorted(unknown))}",
                                 hint=f"known: {', '.join(sorted(known))}")
        return cls(**values)


def lr_at(config: TrainConfig, epoch: int) -> float:
    """The learning rate of ``epoch`` (0-based) under the config's schedule."""
    if config.schedule == "step":
        return config.lr * config.gamma ** (epoch // config.step_size)
    if config.schedule == "exponential":
        return config.lr * config.gamma ** epoch
    if config.schedule == "cosine":
        return config.lr * (1 + math.cos(math.pi * min(epoch, config.epochs) / max(config.epochs, 1))) / 2
    return config.lr


# -- the trainer ----------------------------------------------------------------------------

@dataclass
class TrainResult:
    network: Network
    records: list[dict]
    final: dict = field(default_factory=dict)
    iterations: int = 0
    epochs: int = 0
    seconds: float = 0.0


class Trainer:
    """Trains ``network`` on ``data``; engines plug in through ``hooks`` (see module doc)."""

    #: this process's part in a data-parallel run (runtime.distributed.DataParallel); None: alone
    data_parallel = None

    def __init__(self, network: Network, data, config: TrainConfig | None = None, *,
                 log: RunLog | None = None, hooks: Sequence[Any] = ()):
        self.config = config or TrainConfig()
        self.network = network
        # data in the network's dtype, on its device when they fit there (else batch by batch)
        self.train_split, self.test_split = (place(split, network.device) for split in as_splits(data, network.dtype))
        check_data_fits(network, self.train_split, self.config.loss, self.test_split)
        self.log = log if log is not None else RunLog()
        self.hooks = list(hooks)
        self.loss = loss_fn(self.config.loss)
        self.generator = torch.Generator().manual_seed(self.config.seed)
        self.optimizer = make_optimizer(self.network.module, self.trainable(), self.config)
        self.epoch = 0          # epochs completed
        self.iteration = 0      # optimizer steps taken
        self.stop_requested = False
        self._progress = None

    # -- pieces engines reuse -------------------------------------------------------------
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.network.module.parameters() if p.requires_grad]

    def named_trainable(self) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in self.network.module.named_parameters() if p.requires_grad}

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[float, torch.Tensor]:
        """One optimizer step on a batch; returns the batch loss (before the step) and the
        network's output on the batch."""
        self.optimizer.zero_grad(set_to_none=True)
        output = self.network.module(x)
        loss = self.loss(output, y)
        loss.backward()
        self.optimizer.step()
        self.iteration += 1
        return float(loss.detach()), output.detach()

    def evaluate(self, split: str = "test") -> dict | None:
        chosen = self.test_split if split == "test" else self.train_split
        return None if chosen is None else self.measure(self.network, chosen)

    def measure(self, network: Network, split) -> dict:
        """Mean loss and error of ``network`` on ``split`` (a data-parallel trainer sums the parts
        of all processes)."""
        return evaluate(network, split, self.config.loss)

    def train_batch(self, index) -> tuple[float, int | None, int]:
        """One optimizer step on the training rows ``index``: the batch's mean loss, its
        misclassified samples (None for regression targets) and its size."""
        x, y = self.train_split.rows(index, self.network.device)
        value, output = self.step(x, y)
        return value, error_count(output, y), int(x.shape[0])

    def replace_network(self, network: Network, carry: Callable[[str, torch.Tensor], torch.Tensor | None] | dict | None = None,
                        *, record=None, **event: Any) -> None:
        """Continue training ``network`` in place of the current one, keeping the optimizer's
        state (momentum buffers, Adam moments and step counts). An optimizer whose state is tied to
        the layers (the Frobenius-type preconditioner) is rebuilt on the new network instead (its
        statistics are re-estimated from the next batch).

        With ``record`` (the passes.Record of the pass that made ``network``) the optimizer is
        rewired by ``passes.transfer_optimizer``, which follows the record's parameter origins.
        ``carry`` says where a new parameter's state comes from: a dict new name -> old name,
        or a function (new name, new parameter) -> old parameter name or None. By default a
        parameter keeps the state of the old parameter of the same name and shape; new
        parameters start with fresh state. Logs an ``architecture`` event with ``event``.
        """
        check_data_fits(network, self.train_split)
        kind = optimizer_kind(self.config.optimizer)
        if not kind.carries_state:
            # its state is tied to the old layers (e.g. the preconditioner's statistics): the new
            # network's optimizer starts afresh from its next batch, at the current lr
            lr = self.optimizer.param_groups[0]["lr"]
            kind.release(self.optimizer)
            self.network = network
            self.optimizer = make_optimizer(network.module, self.trainable(), self.config)
            self.set_lr(lr)
        else:
            if record is None:
                record = passes.record_by_name(self.network.module, network.module, carry)
            passes.transfer_optimizer(self.optimizer, self.network.module, network.module, record)
            self.network = network
        self.log.log("architecture", epoch=self.epoch, iteration=self.iteration,
                     params=network.graph.num_params(), flops=network.graph.flops(), **event)

    def request_stop(self) -> None:
        self.stop_requested = True

    # -- the loop -------------------------------------------------------------------------
    def _call(self, method: str, *args) -> None:
        for hook in self.hooks:
            fn = getattr(hook, method, None)
            if fn is not None:
                fn(self, *args)

    def _done(self) -> bool:
        cfg = self.config
        return (self.stop_requested or self.epoch >= cfg.epochs or
                (cfg.iterations is not None and self.iteration >= cfg.iterations))

    def log_eval(self, train_loss: float | None = None, train_error: float | None = None) -> dict:
        test = self.evaluate("test")
        return self.log.log("eval", epoch=self.epoch, iteration=self.iteration, train_loss=train_loss,
                            train_error=train_error, test_loss=test and test["loss"],
                            test_error=test and test["error"], params=self.network.graph.num_params())

    def fit(self) -> TrainResult:
        """Train until ``epochs`` (or ``iterations``) are done or a hook asks to stop."""
        cfg = self.config
        self.network.module.train()
        self.log.log("start", config=cfg.to_dict(), network=self.network.graph.name,
                     params=self.network.graph.num_params(), flops=self.network.graph.flops(),
                     train_size=len(self.train_split), test_size=len(self.test_split) if self.test_split else 0)
        self._call("on_train_start")
        if self.epoch == 0:
            self.log_eval(self.evaluate("train")["loss"])
        self._progress = _progress_bar(cfg)
        last_eval = self.log.records[-1]
        try:
            while not self._done():
                self._call("on_epoch_start")
                if self._done():
                    break
                self.set_lr(lr_at(cfg, self.epoch))
                epoch_loss, epoch_wrong, seen, classified = 0.0, 0, 0, True
                for index in batches(len(self.train_split), cfg.batch, self.generator):
                    value, wrong, size = self.train_batch(index)
                    classified = classified and wrong is not None
                    epoch_wrong += wrong or 0
                    epoch_loss += value * size
                    seen += size
                    if cfg.log_steps:
                        record = self.log.log("step", epoch=self.epoch, iteration=self.iteration, loss=value,
                                              lr=self.optimizer.param_groups[0]["lr"])
                        self._call("on_step_end", record)
                    if not math.isfinite(value):
                        self.log.log("diverged", epoch=self.epoch, iteration=self.iteration)
                        self.stop_requested = True
                    if self.stop_requested or (cfg.iterations is not None and self.iteration >= cfg.iterations):
                        break
                self.epoch += 1
                if self.epoch % cfg.eval_every == 0 or self._done():
                    last_eval = self.log_eval(epoch_loss / max(seen, 1),
                                              epoch_wrong / max(seen, 1) if classified else None)
                if self._progress is not None:
                    self._progress.update(1)
                    self._progress.set_postfix(loss=f"{epoch_loss / max(seen, 1):.4g}",
                                               test_error=_fmt(last_eval.get("test_error")),
                                               params=self.network.graph.num_params(), refresh=False)
                self._call("on_epoch_end")
        finally:
            if self._progress is not None:
                self._progress.close()
                self._progress = None
        self._call("on_train_end")
        final = {"train": self.evaluate("train"), "test": self.evaluate("test"),
                 "epochs": self.epoch, "iterations": self.iteration, "seconds": self.log.elapsed(),
                 "params": self.network.graph.num_params(), "flops": self.network.graph.flops()}
        self.log.log("end", **final)
        return TrainResult(self.network, self.log.records, final, self.iteration, self.epoch, self.log.elapsed())

    def write_progress(self, text: str) -> None:
        """Print a line without breaking the progress bar."""
        if self._progress is not None:
            self._progress.write(text)
        elif self.config.progress:
            print(text, flush=True)


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _progress_bar(config: TrainConfig):
    if not config.progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=config.epochs, desc="train", unit="epoch", leave=False, dynamic_ncols=True)


def train(network: Network, data, config: TrainConfig | None = None, *, log: RunLog | None = None,
          hooks: Sequence[Any] = ()) -> TrainResult:
    """Train ``network`` on ``data`` (x_train, y_train, x_test, y_test) with ``config``."""
    return Trainer(network, data, config, log=log, hooks=hooks).fit()
