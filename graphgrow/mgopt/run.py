"""The one-call MG/Opt engine the CLI calls: build a hierarchy from a spec, train, write the run."""
from __future__ import annotations

import math
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..compiler.io import load_network
from ..compiler.network import Network
from ..errors import GraphgrowError
from ..runtime.data import load_data
from ..runtime.checkpoint import Checkpointer, resume_run
from ..runtime.runlog import RunLog
from ..runtime.splits import as_splits, check_data_fits
from .network import build_network_hierarchy, iterations_per_epoch, load_params
from .optimizer import MGOptConfig, optimize, prolong_from


@dataclass
class MGOptResult:
    network: Any
    records: list[dict]
    summary: dict
    out: Any = None


def run(spec=None, data="spiral", *, hierarchy: str = "depth", levels: int = 2, kappa: float = 0.5, K: int = 10,
        lam: float = 0.0, alpha: float = 0.1, alpha_bar: float | None = None, alpha_cgc: float = 1.0,
        variant: str = "mgopt", epochs: int = 10, batch: int | None = 100, loss: str = "cross_entropy",
        pre_smooth: int = 1, post_smooth: int = 1, min_gap: int = 1, descent_check: bool = True,
        backtracking: int = 0, schedule: str = "constant", decay: float = 100.0, nested_epochs: int = 1,
        interpolation: str = "constant", out=None, seed: int = 0, progress: bool = False, eval_every: int = 1,
        evals_per_epoch: int = 1, work_budget: float | None = None, log_steps: bool = True,
        export: bool = True, checkpoint_every: int | None = None, resume=None) -> MGOptResult:
    """Train ``spec`` on ``data`` with multilevel optimisation on a hierarchy built from it.

    ``spec``: spec path, LayerGraph or Network; ``data``: a data set or spiral / mnist:PATH /
    npz:PATH. ``hierarchy``: depth | width | batch | resolution with ``levels`` levels (1 level:
    plain SGD). ``variant``: mgopt (Algorithm 5, V-cycle for levels > 2), no-correction, or
    nested (``nested_epochs`` epochs of SGD on each coarse level, coarsest first, then
    ``epochs`` on the finest). ``interpolation`` (constant | linear) is the depth prolongation.
    One epoch is ceil(train size / batch) fine iterations with mini-batches drawn by ``seed``.
    With ``out`` the run directory gets log.jsonl (step and eval records with wall time and
    work units), summary.json, final.yaml + .pt, model.pt2, curves.png and checkpoints/ (every
    ``checkpoint_every`` iterations, else every epoch's worth of iterations, and at
    SIGINT/SIGTERM); ``resume=RUNDIR`` continues an interrupted run from its latest checkpoint
    with its own options (see graphgrow.sensli.grow). The full training and
    test sets are evaluated every ``eval_every`` epochs, or ``evals_per_epoch`` times per epoch.
    ``work_budget`` (work units, one = a fine gradient evaluation) ends training when spent,
    whichever of it and ``epochs`` comes first (to compare contenders at equal work)."""
    options = {name: value for name, value in locals().items() if name not in ("spec", "out", "progress", "resume")}
    if resume is None:
        if spec is None:
            raise GraphgrowError("mgopt needs a spec",
                                 hint="give a spec, or --resume RUNDIR (resume=RUNDIR) to continue an interrupted run")
        network = load_network(spec, seed)
        return _run(network, load_data(data, seed), options,
                    str(getattr(network.graph, "source", None) or network.graph.name), out, progress)
    checkpoint, saved = resume_run("mgopt", run, options, spec, out, resume)
    return _run(Network.build(checkpoint.graph, checkpoint.state["weights"]), load_data(saved["data"], saved["seed"]),
                saved, checkpoint.meta["spec"], resume, progress, checkpoint)


def _run(network, dataset, o: dict, spec_name: str, out, progress: bool, checkpoint=None) -> MGOptResult:
    """Run (or, with ``checkpoint``, continue) an MG/Opt run with ``o`` (run's keywords)."""
    from ..runtime.plots import plot_run
    hierarchy, levels, variant, epochs, batch, loss, seed = (o[k] for k in (
        "hierarchy", "levels", "variant", "epochs", "batch", "loss", "seed"))
    work_budget, eval_every, evals_per_epoch, log_steps = (o[k] for k in (
        "work_budget", "eval_every", "evals_per_epoch", "log_steps"))
    config = MGOptConfig(**{k: o[k] for k in ("alpha", "alpha_bar", "alpha_cgc", "kappa", "K", "lam", "variant",
                                              "pre_smooth", "post_smooth", "min_gap", "descent_check",
                                              "backtracking", "schedule", "decay")})
    if not (isinstance(epochs, int) and epochs >= 0):
        raise GraphgrowError(f"epochs must be a non-negative integer, got {epochs!r}")
    train_split, test_split = as_splits(dataset)
    check_data_fits(network, train_split)
    options = {"interpolation": o["interpolation"]} if hierarchy == "depth" else {}
    levels_built = build_network_hierarchy(network, train_split, hierarchy, levels, batch=batch, loss=loss, **options)
    per_epoch = iterations_per_epoch(len(train_split), batch)
    if not (isinstance(evals_per_epoch, int) and evals_per_epoch >= 1 and isinstance(eval_every, int) and eval_every >= 1):
        raise GraphgrowError("eval_every and evals_per_epoch must be positive integers")
    eval_interval = max(per_epoch // evals_per_epoch, 1) if evals_per_epoch > 1 else per_epoch * eval_every
    config.nested_iterations = o["nested_epochs"] * per_epoch
    iterations = epochs * per_epoch
    fine = levels_built.levels[0]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        total = iterations + (config.nested_iterations * (len(levels_built) - 1) if variant == "nested" else 0)
        bar = tqdm(total=total, initial=checkpoint.meta["step"] if checkpoint else 0, desc=f"mgopt {variant}",
                   unit="it", leave=False, dynamic_ncols=True)

    checkpointer = None
    if out is not None:
        saved = {**o, "data": o["data"] if isinstance(o["data"], str) else None}
        every = per_epoch if o["checkpoint_every"] is None else o["checkpoint_every"]
        checkpointer = Checkpointer(out, "mgopt", {"options": saved, "spec": spec_name}, every=every)
    log = RunLog(out, resume=None if checkpoint is None else checkpoint.state["log_length"])
    with log, (checkpointer.interrupt.installed() if checkpointer else nullcontext()):
        if checkpoint is None:
            log.log("start", config=config.to_dict(), hierarchy=hierarchy, levels=levels_built.names,
                    network=network.graph.name, params=network.graph.num_params(), flops=network.graph.flops(),
                    costs=[p.cost for p in levels_built.levels], epochs=epochs, batch=batch, seed=seed,
                    train_size=len(train_split), test_size=len(test_split) if test_split else 0)
        else:
            for name, reason in checkpoint.skipped:
                log.log("checkpoint_skipped", checkpoint=name, reason=reason)
            restore_buffers(levels_built, checkpoint.state["buffers"])
            torch.set_rng_state(checkpoint.state["torch_rng"])
            log.log("resume", checkpoint=checkpoint.directory.name, iteration=checkpoint.meta["step"])
        origin = time.perf_counter() - (checkpoint.state["train_time"] if checkpoint else 0.0)
        excluded = 0.0  # evaluation time is not training time

        def evaluate_and_log(params, iteration, epoch, work, phase="fine"):
            nonlocal excluded
            began = time.perf_counter()
            train = fine.evaluate(params, train_split)
            test = fine.evaluate(params, test_split) if test_split is not None else None
            record = log.log("eval", epoch=epoch, iteration=iteration, work=work, phase=phase,
                             train_time=began - origin - excluded, train_loss=train["loss"],
                             train_error=train["error"], test_loss=test and test["loss"],
                             test_error=test and test["error"])
            excluded += time.perf_counter() - began
            return record

        if checkpoint is None:
            evaluate_and_log(fine.parameters(), 0, 0, 0.0)
        seen = {"fine": checkpoint.state["fine_iterations"] if checkpoint else 0}

        def save(optimizer):
            state = {"optimizer": optimizer.state_dict(), "fine_iterations": seen["fine"],
                     "weights": {**network.state(), **fine_iterate(levels_built, optimizer)},
                     "buffers": level_buffers(levels_built), "torch_rng": torch.get_rng_state(),
                     "train_time": time.perf_counter() - origin - excluded, "log_length": len(log.records)}
            return checkpointer.write(optimizer.iteration, network.graph, state, phase=list(optimizer.phase))

        def on_iteration(params, info, optimizer):
            if log_steps:
                log.log("step", iteration=info.iteration, kind=info.kind, loss=info.loss, work=info.work,
                        grad_sq_norm=info.grad_sq_norm, restricted_sq_norm=info.restricted_sq_norm,
                        slope=info.slope, step=info.step, reason=info.reason)
            if bar is not None:
                bar.update(1)
            if not math.isfinite(info.loss):
                raise _Diverged(info.iteration)
            if info.kind.startswith("level"):
                done = info.iteration + 1
                if done % eval_interval == 0:
                    evaluate_and_log(params, done, 0, info.work, phase=info.kind)
            else:
                seen["fine"] += 1
                last = seen["fine"] == iterations or (work_budget is not None and optimizer.work >= work_budget)
                if seen["fine"] % eval_interval == 0 or last:
                    epoch = seen["fine"] / per_epoch
                    evaluate_and_log(params, info.iteration + 1, int(epoch) if epoch.is_integer() else epoch, info.work)
            if checkpointer is not None:
                checkpointer.stop_if_interrupted(log, lambda: save(optimizer), iteration=optimizer.iteration)
                if checkpointer.due(optimizer.iteration):
                    save(optimizer)

        try:
            theta, _, optimizer = optimize(levels_built, fine.parameters(), config, iterations, seed=seed,
                                                 work_budget=work_budget, callback=on_iteration,
                                                 resume=checkpoint.state["optimizer"] if checkpoint else None)
            diverged = None
        except _Diverged as stop:
            log.log("diverged", iteration=stop.iteration)
            theta, optimizer, diverged = None, None, stop.iteration
        finally:
            if bar is not None:
                bar.close()
        if theta is not None:
            load_params(network, theta)
        final = {"train": fine.evaluate(fine.parameters(), train_split),
                 "test": fine.evaluate(fine.parameters(), test_split) if test_split is not None else None,
                 "train_time": time.perf_counter() - origin - excluded,
                 "work": optimizer.work if optimizer else None,
                 "iterations": optimizer.iteration if optimizer else 0, "corrections": optimizer.corrections if optimizer else 0,
                 "rejected": optimizer.rejections if optimizer else 0, "diverged": diverged}
        log.log("end", **final)
        summary = {"spec": spec_name,
                   "hierarchy": hierarchy, "levels": levels_built.names,
                   "costs": [p.cost for p in levels_built.levels], "variant": variant, "seed": seed,
                   "epochs": epochs, "batch": batch, "config": config.to_dict(), "final": final}
        if out is not None:
            log.save_network(network)
            if o["export"]:
                log.export(network)
            plot_run(log.records, log.path("curves.png"),
                     title=f"{network.graph.name}: MG/Opt {variant}, {hierarchy} x{len(levels_built)}")
            log.write_json("summary.json", summary)
    return MGOptResult(network, log.records, summary, out)


def level_buffers(hierarchy) -> list[dict]:
    """The buffers (batch-norm statistics) of every level's network: the iterates hold only
    trainable parameters."""
    return [{n: b.detach().clone() for n, b in level.network.module.named_buffers()} for level in hierarchy.levels]


def restore_buffers(hierarchy, saved: list[dict]) -> None:
    with torch.no_grad():
        for level, buffers in zip(hierarchy.levels, saved):
            named = dict(level.network.module.named_buffers())
            for name, value in buffers.items():
                named[name].copy_(value)


def fine_iterate(hierarchy, optimizer) -> dict:
    """The optimizer's current parameters on the finest level (prolonged during nested iteration)."""
    if optimizer.iterate is None:
        return {}
    return prolong_from(hierarchy, optimizer.iterate, optimizer.phase[0])


class _Diverged(Exception):
    def __init__(self, iteration: int):
        super().__init__(f"loss is not finite at iteration {iteration}")
        self.iteration = iteration
