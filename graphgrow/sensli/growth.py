"""When and how SensLI grows a training network: the growth hook of Algorithm 6 and the
one-call ``grow``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from ..compiler.io import load_network
from ..errors import GraphgrowError
from ..runtime.data import load_data
from ..runtime.devices import place_network
from ..runtime.distributed import DEFAULT_TIMEOUT, DataParallelTrainer, joined
from ..runtime.flops import CostLedger
from ..runtime.runlog import RunLog
from ..runtime.splits import Split, as_splits, check_data_fits
from ..runtime.train import TrainConfig, Trainer
from .sensitivity import STRATEGIES, insert_candidates, select, sensitivities
from .widening import widen_best

# -- when: the growth hook (Algorithm 6) ----------------------------------------------------------

def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(*, strategy: str, insert_at, insert_every, max_insertions, tau, per_step, widen,
                   epochs: int | None = None) -> None:
    """Every growth option a user can get wrong, each error naming its option; with ``epochs``,
    also that the insertion epochs fall inside the run (tries happen at the end of epochs
    1 .. epochs-1)."""
    if strategy not in STRATEGIES:
        raise GraphgrowError(f"unknown strategy '{strategy}'", option="strategy", hint=f"use one of {', '.join(STRATEGIES)}")
    if insert_at and insert_every is not None:
        raise GraphgrowError("insert_at and insert_every cannot be combined", option="insert_at",
                             hint="insert_at lists the epochs; insert_every tries every N epochs")
    if insert_every is not None and not (_count(insert_every) and insert_every >= 1):
        raise GraphgrowError(f"must be a positive integer, got {insert_every!r}", option="insert_every")
    for epoch in insert_at or ():
        if not (_count(epoch) and epoch >= 1):
            raise GraphgrowError(f"insertion epochs must be positive integers, got {epoch!r}", option="insert_at",
                                 hint="an insertion is tried at the end of the epoch named")
        if epochs is not None and epoch >= epochs:
            raise GraphgrowError(f"insertion epoch {epoch} is not before the last epoch ({epochs})", option="insert_at",
                                 hint=f"insertions are tried at the end of epochs 1..{epochs - 1}; raise epochs or lower it")
    if not (_count(max_insertions) and max_insertions >= 0):
        raise GraphgrowError(f"must be a non-negative integer, got {max_insertions!r}",
                             option="max_insertions")
    if not (_count(per_step) and per_step >= 1):
        raise GraphgrowError(f"must be a positive integer, got {per_step!r}", option="per_step")
    if not (_count(widen) and widen >= 0):
        raise GraphgrowError(f"must be a non-negative integer (neurons added per try), got {widen!r}",
                             option="widen")
    if tau is not None and not tau >= 1:
        raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.18), got {tau}", option="tau")


class GrowthHook:
    """Trainer hook running Algorithm 6: at the scheduled epochs (``insert_at`` or every
    ``insert_every`` epochs, at most ``max_insertions`` layers in all) it computes the
    sensitivities, selects by ``strategy`` (and ``tau``), inserts and lets training go on with
    the optimizer state carried over. Keeps the FLOP ledger of the run."""

    def __init__(self, *, strategy: str = "sensli", insert_at: Iterable[int] | None = None,
                 insert_every: int | None = None, max_insertions: int = 1, tau: float | None = None,
                 per_step: int = 1, norm: str = "fro", sens_batch: int | None = 256,
                 sample: int | float | None = None, seed: int = 0, widen: int = 0):
        check_schedule(strategy=strategy, insert_at=insert_at, insert_every=insert_every,
                       max_insertions=max_insertions, tau=tau, per_step=per_step, widen=widen)
        self.strategy, self.tau, self.per_step, self.norm = strategy, tau, per_step, norm
        self.insert_at = set(insert_at or ())
        self.insert_every = insert_every
        self.max_insertions = max_insertions
        self.sens_batch, self.sample, self.seed = sens_batch, sample, seed
        self.generator = torch.Generator().manual_seed(seed + 7919)  # random strategy, apart from data order
        self.widen = widen  # > 0: add this many neurons per try (4.4) instead of inserting layers
        self.inserted = 0
        self.ledger = CostLedger()
        self.insertions: list[dict] = []

    def due(self, epoch: int) -> bool:
        return (epoch in self.insert_at or (self.insert_every is not None and epoch % self.insert_every == 0))

    def on_epoch_end(self, trainer) -> None:
        graph = trainer.network.graph
        self.ledger.add_epoch(graph_signature(graph), graph.flops())
        if (self.inserted >= self.max_insertions or not self.due(trainer.epoch)
                or trainer.epoch >= trainer.config.epochs or self.strategy == "none"):
            return
        if self.widen:
            self._widen(trainer)
            return
        report = sensitivities(trainer.network, trainer_data(trainer), norm=self.norm, loss=trainer.config.loss,
                               batch=self.sens_batch, sample=self.sample, seed=self.seed + trainer.epoch,
                               progress=trainer.config.progress, data_parallel=trainer.data_parallel)
        self.ledger.add_sensitivity(report.flops_per_sample, report.samples / len(trainer.train_split))
        room = min(self.per_step, self.max_insertions - self.inserted)
        chosen = select(report, self.strategy, tau=self.tau if self.strategy == "sensli" else None,
                        count=room, generator=self.generator)
        trainer.log.log("sensitivities", epoch=trainer.epoch, iteration=trainer.iteration, **report.to_json())
        best = max(report.candidates, key=lambda c: c.merit)
        event = {"epoch": trainer.epoch, "iteration": trainer.iteration, "strategy": self.strategy,
                 "positions": [c.position for c in chosen], "merits": [c.merit for c in chosen],
                 "ratios": [report.ratio(c) for c in chosen], "best_ratio": report.ratio(best),
                 "tau": self.tau, "sensitivity_seconds": report.seconds}
        if not chosen:
            trainer.log.log("insertion", inserted=False, **event)
            trainer.write_progress(f"epoch {trainer.epoch}: no insertion (best merit ratio "
                                   f"{report.ratio(best):.3g} < tau {self.tau})")
            return
        # the loss before comes free with the sensitivity pass; the one after (equal up to
        # rounding: the insertion preserves the function) is taken on the same samples, so an
        # insertion costs one forward pass over them, not two over the whole training split
        before, params_before = report.loss, graph.num_params()
        grown, kept = insert_candidates(trainer.network, [c.position for c in chosen])
        split = trainer.train_split
        rows = split if report.rows is None else Split(split.x[report.rows], split.y[report.rows])
        after = trainer.measure(grown, rows)["loss"]
        trainer.replace_network(grown, record=kept, reason="insertion", positions=event["positions"])
        self.inserted += len(chosen)
        record = trainer.log.log("insertion", inserted=True, loss_before=before, loss_after=after,
                                 loss_samples=report.samples, params_before=params_before, params_after=grown.graph.num_params(),
                                 nodes=[c.node for c in chosen], **event)
        self.insertions.append(record)
        where = ", ".join(f"{c.kind} layer after {c.after} (merit {c.merit:.3g}, ratio {report.ratio(c):.3g})" for c in chosen)
        trainer.write_progress(f"epoch {trainer.epoch}: inserted {len(chosen)} layer(s) at {where}; "
                               f"train loss before {before:.4f}, after {after:.4f}; "
                               f"{params_before} -> {grown.graph.num_params()} parameters")


    def _widen(self, trainer) -> None:
        before = trainer.evaluate("train")["loss"]
        params_before = trainer.network.graph.num_params()
        wider, chosen, reference = widen_best(trainer.network, trainer_data(trainer), count=self.widen, tau=self.tau,
                                              loss=trainer.config.loss, batch=self.sens_batch,
                                              seed=self.seed + trainer.epoch, data_parallel=trainer.data_parallel)
        event = {"epoch": trainer.epoch, "iteration": trainer.iteration, "reference": reference,
                 "neurons": [c.to_json() for c in chosen], "tau": self.tau}
        if not chosen:
            trainer.log.log("widening", inserted=False, **event)
            return
        after = trainer.measure(wider, trainer.train_split)["loss"]
        trainer.replace_network(wider, reason="widening")
        self.inserted += 1
        record = trainer.log.log("widening", inserted=True, loss_before=before, loss_after=after,
                                 params_before=params_before, params_after=wider.graph.num_params(),
                                 positions=sorted({c.layer for c in chosen}), **event)
        self.insertions.append(record)
        trainer.write_progress(f"epoch {trainer.epoch}: added {len(chosen)} neuron(s) to "
                               f"{', '.join(record['positions'])}; train loss before {before:.4f}, after {after:.4f}")


def graph_signature(graph) -> str:
    """A short name of an architecture: its node ops and widths."""
    return f"{graph.name}[{graph.num_params()} params, {graph.flops()} FLOPs]"


def trainer_data(trainer):
    """The trainer's training split in the x_train/y_train form ``sensitivities`` reads."""
    from types import SimpleNamespace
    return SimpleNamespace(x_train=trainer.train_split.x, y_train=trainer.train_split.y)


@dataclass
class GrowResult:
    network: object
    records: list[dict]
    insertions: list[dict]
    summary: dict
    out: object = None


def grow(spec, data="spiral", *, strategy: str = "sensli", insert_every: int | None = None,
         insert_at: Iterable[int] | None = None, max_insertions: int = 1, tau: float | None = None,
         per_step: int = 1, norm: str = "fro", epochs: int = 100, lr: float = 0.1, batch: int | None = None,
         momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd", damping: float = 0.01,
         loss: str = "cross_entropy",
         sens_batch: int | None = 256, sample: int | float | None = None, out=None, seed: int = 0,
         progress: bool = False, eval_every: int = 1, log_steps: bool = True, export: bool = True,
         widen: int = 0, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, dist_timeout: float = DEFAULT_TIMEOUT) -> GrowResult:
    """Train ``spec`` on ``data`` while SensLI (or a comparison strategy) inserts layers.

    ``spec``: spec path, LayerGraph or Network; ``data``: a data set or spiral / mnist:PATH /
    npz:PATH. With ``out`` a run directory gets log.jsonl, summary.json, final.yaml + .pt,
    model.pt2 and curves.png. ``widen=k`` adds the k best neurons per try (4.4, 4.20)
    instead of inserting layers (``max_insertions`` then counts widening steps). ``device``
    (auto, cpu, cuda, cuda:N, mps) and ``dtype`` (float32, float64): where and in which type the
    network trains (None: as it is); the data are cast to the network's dtype. Returns the grown
    network, the records, the insertion events and the summary (final metrics, FLOPs per
    training sample as in thesis Tables 4.2/4.4). Started as one of several ranks (``graphgrow
    grow --nproc N`` or torchrun; runtime.distributed) it trains data-parallel, with collectives
    that give up after ``dist_timeout`` seconds; rank 0 writes the run directory."""
    from ..runtime.plots import plot_run
    config = TrainConfig(epochs=epochs, lr=lr, batch=batch, momentum=momentum, weight_decay=weight_decay,
                         optimizer=optimizer, damping=damping, loss=loss, seed=seed, progress=progress,
                         eval_every=eval_every, log_steps=log_steps)
    check_schedule(strategy=strategy, insert_at=insert_at, insert_every=insert_every, max_insertions=max_insertions,
                   tau=tau, per_step=per_step, widen=widen, epochs=epochs)
    dataset = load_data(data, seed)
    network = place_network(load_network(spec, seed), device, dtype)
    # everything a user can get wrong is checked before the run directory is created
    train_split, test_split = as_splits(dataset, network.dtype)
    check_data_fits(network, train_split, loss, test_split)
    if insert_every is None and not insert_at and strategy != "none":
        # no schedule given: max_insertions tries spread evenly over the run (README, --insert-every)
        insert_every = max(epochs // (max_insertions + 1), 1)
    hook = GrowthHook(strategy=strategy, insert_at=insert_at, insert_every=insert_every,
                      max_insertions=max_insertions, tau=tau, per_step=per_step, norm=norm,
                      sens_batch=sens_batch, sample=sample, seed=seed, widen=widen)
    start_params, start_flops = network.graph.num_params(), network.graph.flops()
    with joined(network.device, dist_timeout) as parallel:
        if parallel is not None:  # rank 0 alone shows progress and writes the run directory
            network.to(parallel.device)
            config.progress = config.progress and parallel.rank == 0
            out = out if parallel.rank == 0 else None
        with RunLog(out) as log:
            if parallel is None:
                trainer = Trainer(network, dataset, config, log=log, hooks=[hook])
            else:
                trainer = DataParallelTrainer(network, dataset, config, log=log, hooks=[hook], data_parallel=parallel)
            result = trainer.fit()
            graph = result.network.graph
            summary = {"spec": str(getattr(network.graph, "source", None) or network.graph.name),
                       "strategy": f"widen {widen}" if widen else strategy,
                       "seed": seed, "config": config.to_dict(), "tau": tau, "norm": norm,
                       "final": result.final, "insertions": [{k: r.get(k) for k in (
                           "epoch", "iteration", "positions", "nodes", "merits", "ratios", "loss_before", "loss_after",
                           "params_before", "params_after")} for r in hook.insertions],
                       "rejected": [r["epoch"] for r in log.records
                                    if r["event"] in ("insertion", "widening") and not r["inserted"]],
                       "params": {"start": start_params, "final": graph.num_params()},
                       "flops_per_sample": {"forward_start": start_flops, "forward_final": graph.flops(),
                                            "training_step_start": 3 * start_flops,
                                            "training_step_final": 3 * graph.flops(),
                                            "run": hook.ledger.to_dict()}}
            if out is not None:
                log.save_network(result.network)
                if export:
                    log.export(result.network)
                plot_run(log.records, log.path("curves.png"),
                         title=f"{graph.name}: {strategy}, {len(hook.insertions)} insertion event(s)")
                log.write_json("summary.json", summary)
    return GrowResult(result.network, log.records, hook.insertions, summary, out)

