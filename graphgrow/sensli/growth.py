"""When and how SensLI grows a training network: the growth hook of Algorithm 6 and the
one-call ``grow``."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

from ..compiler.io import load_network
from ..errors import GraphgrowError
from ..runtime.data import load_data
from ..runtime.devices import place_network
from ..runtime.distributed import DEFAULT_TIMEOUT, DataParallelTrainer, join_checkpoints, joined
from ..runtime.flops import CostLedger
from ..runtime.runlog import RunLog
from ..runtime.splits import Split, as_splits, check_data_fits
from ..runtime.train import TrainConfig, Trainer
from .sensitivity import CANDIDATE_KINDS, STRATEGIES, insert_candidates, select, sensitivities
from .widening import NEURON_INITS, widen_best

# -- when: the growth hook (Algorithm 6) ----------------------------------------------------------

def _count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_schedule(*, strategy: str, insert_at, insert_every, max_insertions, tau, per_step, widen,
                   neurons: str = "random", epochs: int | None = None, candidates: str = "all") -> None:
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
    if neurons not in NEURON_INITS:
        raise GraphgrowError(f"unknown neuron initialisation {neurons!r}", option="neurons",
                             hint=f"use one of {', '.join(NEURON_INITS)}")
    if tau is not None and not tau >= 1:
        raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.18), got {tau}", option="tau")
    if candidates not in CANDIDATE_KINDS:
        raise GraphgrowError(f"unknown candidate kind '{candidates}'", option="candidates",
                             hint=f"use one of {', '.join(CANDIDATE_KINDS)}")


class GrowthHook:
    """Trainer hook running Algorithm 6: at the scheduled epochs (``insert_at`` or every
    ``insert_every`` epochs, at most ``max_insertions`` layers in all) it computes the
    sensitivities, selects by ``strategy`` (and ``tau``), inserts and lets training go on with
    the optimizer state carried over. Keeps the FLOP ledger of the run."""

    def __init__(self, *, strategy: str = "sensli", insert_at: Iterable[int] | None = None,
                 insert_every: int | None = None, max_insertions: int = 1, tau: float | None = None,
                 per_step: int = 1, norm: str = "fro", sens_batch: int | None = 256,
                 sample: int | float | None = None, seed: int = 0, widen: int = 0, neurons: str = "random",
                 candidates: str = "all"):
        check_schedule(strategy=strategy, insert_at=insert_at, insert_every=insert_every,
                       max_insertions=max_insertions, tau=tau, per_step=per_step, widen=widen, neurons=neurons,
                       candidates=candidates)
        self.candidates = candidates  # all, layers or blocks (sensitivity.CANDIDATE_KINDS)
        self.strategy, self.tau, self.per_step, self.norm = strategy, tau, per_step, norm
        self.insert_at = set(insert_at or ())
        self.insert_every = insert_every
        self.max_insertions = max_insertions
        self.sens_batch, self.sample, self.seed = sens_batch, sample, seed
        self.generator = torch.Generator().manual_seed(seed + 7919)  # random strategy, apart from data order
        self.widen = widen  # > 0: add this many neurons per try (4.4) instead of inserting layers
        self.neurons = neurons  # their incoming weights: random or gradmax
        self.inserted = 0
        self.ledger = CostLedger()
        self.insertions: list[dict] = []

    def state_dict(self) -> dict:
        """What a resumed run needs: insertions so far, the FLOP ledger, the random strategy's generator."""
        return {"inserted": self.inserted, "insertions": self.insertions, "generator": self.generator.get_state(),
                "ledger": asdict(self.ledger)}

    def load_state_dict(self, state: dict) -> None:
        self.inserted, self.insertions = state["inserted"], list(state["insertions"])
        self.generator.set_state(state["generator"])
        self.ledger = CostLedger(**state["ledger"])

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
                               progress=trainer.config.progress, data_parallel=trainer.data_parallel,
                               candidates=self.candidates)
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
        wider, chosen, reference, widened = widen_best(trainer.network, trainer_data(trainer), count=self.widen,
                                                       tau=self.tau, init=self.neurons, loss=trainer.config.loss,
                                                       batch=self.sens_batch, seed=self.seed + trainer.epoch,
                                                       data_parallel=trainer.data_parallel)
        event = {"epoch": trainer.epoch, "iteration": trainer.iteration, "reference": reference,
                 "neurons": [c.to_json() for c in chosen], "tau": self.tau}
        if not chosen:
            trainer.log.log("widening", inserted=False, **event)
            return
        after = trainer.measure(wider, trainer.train_split)["loss"]
        trainer.replace_network(wider, record=widened, reason="widening")
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


def grow(spec=None, data="spiral", *, strategy: str = "sensli", insert_every: int | None = None,
         insert_at: Iterable[int] | None = None, max_insertions: int = 1, tau: float | None = None,
         per_step: int = 1, norm: str = "fro", epochs: int = 100, lr: float = 0.1, batch: int | None = None,
         momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd", damping: float = 0.01,
         loss: str = "cross_entropy",
         sens_batch: int | None = 256, sample: int | float | None = None, out=None, seed: int = 0,
         progress: bool = False, eval_every: int = 1, log_steps: bool = True, export: bool = True,
         widen: int = 0, neurons: str = "random", device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, dist_timeout: float = DEFAULT_TIMEOUT,
         checkpoint_every: int | None = None, resume=None, candidates: str = "all") -> GrowResult:
    """Train ``spec`` on ``data`` while SensLI (or a comparison strategy) inserts layers.

    ``spec``: spec path, LayerGraph or Network; ``data``: a data set or spiral / mnist:PATH /
    npz:PATH. With ``out`` a run directory gets log.jsonl, summary.json, final.yaml + .pt,
    model.pt2, curves.png and checkpoints/ (every ``checkpoint_every`` optimizer steps, else at
    the end of every epoch; always after a growth event and at SIGINT/SIGTERM, which then raise
    graphgrow.runtime.checkpoint.RunInterrupted). ``resume=RUNDIR`` continues an interrupted run
    from its latest checkpoint with the options it was started with (an option given here that
    differs from its default and from the run's is an error; data given as an object must be
    given again), on the device and in the dtype the run used. ``widen=k`` adds the k best
    neurons per try (4.4, 4.20) instead of inserting layers (``max_insertions`` then counts
    widening steps); ``neurons``: their incoming weights, ``random`` or ``gradmax`` (data-driven,
    sensli.widening). ``candidates``: what an insertion chooses from, ``all``, ``layers``
    (identity layers) or ``blocks`` (copies of residual blocks with their last layer zero, at
    block boundaries). ``device`` (auto, cpu, cuda, cuda:N, mps) and ``dtype`` (float32,
    float64): where and in which type the network trains (None: as it is); the data are cast to
    the network's dtype. Returns the grown network, the records, the insertion events and the
    summary (final metrics, FLOPs per training sample as in thesis Tables 4.2/4.4). Started as
    one of several ranks (``graphgrow grow --nproc N`` or torchrun; runtime.distributed) it
    trains data-parallel, with collectives that give up after ``dist_timeout`` seconds; rank 0
    writes the run directory and its checkpoints, at steps all ranks agree on."""
    options = {name: value for name, value in locals().items() if name not in _NOT_OPTIONS}
    if resume is None:
        if spec is None:
            raise GraphgrowError("grow needs a spec",
                                 hint="give a spec, or --resume RUNDIR (resume=RUNDIR) to continue an interrupted run")
        check_schedule(strategy=strategy, insert_at=insert_at, insert_every=insert_every,
                       max_insertions=max_insertions, tau=tau, per_step=per_step, widen=widen,
                       neurons=neurons, epochs=epochs, candidates=candidates)
        dataset = load_data(data, seed)
        network = place_network(load_network(spec, seed), device, dtype)
        start = {"spec": str(getattr(network.graph, "source", None) or network.graph.name),
                 "params": network.graph.num_params(), "flops": network.graph.flops()}
        return _grow(network, dataset, options, start, out, progress)
    from ..runtime.checkpoint import restored_network, resume_run
    checkpoint, saved = resume_run("grow", grow, options, spec, out, resume)
    network = restored_network(checkpoint, checkpoint.state["trainer"]["weights"])
    return _grow(network, load_data(saved["data"], saved["seed"]), saved, checkpoint.meta["start"], resume, progress,
                 checkpoint)


#: grow()'s parameters that are not options a checkpoint keeps
_NOT_OPTIONS = ("spec", "out", "progress", "resume")


def _grow(network, dataset, options: dict, start: dict, out, progress: bool, checkpoint=None) -> GrowResult:
    """Run (or, with ``checkpoint``, continue) a growth run with ``options`` (grow's keywords)."""
    from ..runtime.checkpoint import Checkpointer, placement, restore_trainer, saved_options
    from ..runtime.plots import plot_run
    o = dict(options)
    config = TrainConfig(epochs=o["epochs"], lr=o["lr"], batch=o["batch"], momentum=o["momentum"],
                         weight_decay=o["weight_decay"], optimizer=o["optimizer"], damping=o["damping"],
                         loss=o["loss"], seed=o["seed"], progress=progress, eval_every=o["eval_every"],
                         log_steps=o["log_steps"])
    # everything a user can get wrong is checked before the run directory is created
    train_split, test_split = as_splits(dataset, network.dtype)
    check_data_fits(network, train_split, o["loss"], test_split)
    insert_every = o["insert_every"]
    if insert_every is None and not o["insert_at"] and o["strategy"] != "none":
        # no schedule given: max_insertions tries spread evenly over the run (README, --insert-every)
        insert_every = max(o["epochs"] // (o["max_insertions"] + 1), 1)
    hook = GrowthHook(strategy=o["strategy"], insert_at=o["insert_at"], insert_every=insert_every,
                      max_insertions=o["max_insertions"], tau=o["tau"], per_step=o["per_step"], norm=o["norm"],
                      sens_batch=o["sens_batch"], sample=o["sample"], seed=o["seed"], widen=o["widen"],
                      neurons=o["neurons"], candidates=o.get("candidates", "all"))  # runs saved before it: all
    with joined(network.device, o["dist_timeout"]) as parallel:
        checkpointing = out is not None  # on every rank: the others join rank 0's checkpoints
        if parallel is not None:  # rank 0 alone shows progress and writes the run directory
            join_checkpoints(parallel, checkpointing, o["checkpoint_every"], checkpoint)
            network.to(parallel.device)
            config.progress = config.progress and parallel.rank == 0
            out = out if parallel.rank == 0 else None
        hooks, checkpointer = [hook], None
        if checkpointing:
            meta = {"options": {**saved_options(o), "insert_at": sorted(o["insert_at"]) if o["insert_at"] else o["insert_at"]},
                    "start": start, "placement": placement(network)}
            checkpointer = Checkpointer(out, "grow", meta, every=o["checkpoint_every"], data_parallel=parallel)
            hooks.append(checkpointer)
        log = RunLog(out, resume=None if checkpoint is None else checkpoint.state["log_length"])
        with log, (checkpointer.interrupt.installed() if checkpointer is not None else nullcontext()):
            if parallel is None:
                trainer = Trainer(network, dataset, config, log=log, hooks=hooks)
            else:
                trainer = DataParallelTrainer(network, dataset, config, log=log, hooks=hooks, data_parallel=parallel)
            if checkpoint is not None:
                for name, reason in checkpoint.skipped:
                    log.log("checkpoint_skipped", checkpoint=name, reason=reason)
                restore_trainer(trainer, checkpoint)
                log.log("resume", checkpoint=checkpoint.directory.name, epoch=trainer.epoch,
                        iteration=trainer.iteration)
            result = trainer.fit()
            graph = result.network.graph
            widen, strategy = o["widen"], o["strategy"]
            summary = {"spec": start["spec"], "strategy": f"widen {widen}" if widen else strategy,
                       "seed": o["seed"], "config": config.to_dict(), "tau": o["tau"], "norm": o["norm"],
                       "final": result.final, "insertions": [{k: r.get(k) for k in (
                           "epoch", "iteration", "positions", "nodes", "merits", "ratios", "loss_before", "loss_after",
                           "params_before", "params_after")} for r in hook.insertions],
                       "rejected": [r["epoch"] for r in log.records
                                    if r["event"] in ("insertion", "widening") and not r["inserted"]],
                       "params": {"start": start["params"], "final": graph.num_params()},
                       "flops_per_sample": {"forward_start": start["flops"], "forward_final": graph.flops(),
                                            "training_step_start": 3 * start["flops"],
                                            "training_step_final": 3 * graph.flops(),
                                            "run": hook.ledger.to_dict()}}
            if out is not None:
                log.save_network(result.network)
                if o["export"]:
                    log.export(result.network)
                plot_run(log.records, log.path("curves.png"),
                         title=f"{graph.name}: {strategy}, {len(hook.insertions)} insertion event(s)")
                log.write_json("summary.json", summary)
    return GrowResult(result.network, log.records, hook.insertions, summary, out)
