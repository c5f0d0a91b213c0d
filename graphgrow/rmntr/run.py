"""The one-call RMNTR engine the CLI calls: a network from a spec, the problem (the PINN or a
data set), the hierarchy, an optional Adam warm-up, the method, and the run directory."""
from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from ..compiler.io import load_network
from ..errors import GraphgrowError
from ..runtime.checkpoint import Checkpointer, placement, restored_network, resume_run, saved_options
from ..runtime.data import load_data
from ..runtime.runlog import RunLog
from ..runtime.splits import as_splits, check_data_fits, loss_fn
from .levels import AutogradObjective, build_levels, supervised_loss
from .method import RMNTR, Result, RMNTRConfig
from .pinn import PoissonPINN


@dataclass
class RMNTRRun:
    network: Any
    result: Result
    summary: dict
    records: list
    out: Any = None


def make_problem(network, data, seed: int = 0, loss: str = "cross_entropy"):
    """The network loss for ``data``: ``pinn`` (the PINN of docs/rmntr.md) or a data set /
    spiral / mnist:PATH / npz:PATH (full-batch ``loss`` on its training split)."""
    dtype = next(network.module.parameters()).dtype
    if data == "pinn":
        problem = PoissonPINN(dtype=dtype)
        problem.check_network(network)
        return problem
    train, _ = as_splits(load_data(data, seed))
    check_data_fits(network, train)
    return supervised_loss(train.x.to(dtype), train.y, loss_fn(loss))


def l1_weights(network, beta: float, l1) -> torch.Tensor:
    """beta on the penalised parameters, 0 elsewhere, in the flat parameter order. ``l1``:
    ``weights`` (every ``*.weight``), ``all``, or a list of node names."""
    named = [(n, p) for n, p in network.module.named_parameters() if p.requires_grad]
    if not (isinstance(beta, (int, float)) and beta >= 0):
        raise GraphgrowError(f"beta must be a non-negative number, got {beta!r}")
    if l1 == "weights":
        chosen = lambda name: name.endswith(".weight")   # noqa: E731
    elif l1 == "all":
        chosen = lambda name: True   # noqa: E731
    else:
        layers = [l1] if isinstance(l1, str) else list(l1)
        nodes = {n.name for n in network.graph.nodes}
        unknown = [name for name in layers if name not in nodes]
        if unknown:
            raise GraphgrowError(f"--l1: unknown layer {unknown[0]!r}", file=network.graph.source,
                                 hint=f"use weights, all or node names: {', '.join(sorted(nodes))}")
        chosen = lambda name: name.split(".")[0] in layers   # noqa: E731
    return torch.cat([torch.full((p.numel(),), float(beta) if chosen(n) else 0.0, dtype=p.dtype, device=p.device)
                      for n, p in named])


def adam_warmup(objective: AutogradObjective, x: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """``steps`` Adam steps on the smooth objective alone (counted as gradients)."""
    leaf = x.detach().clone().requires_grad_(True)
    optimizer = torch.optim.Adam([leaf], lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        with torch.enable_grad():
            objective.function(leaf).backward()
        optimizer.step()
    return leaf.detach()


def sparsity(x: torch.Tensor, weight: torch.Tensor) -> float:
    """Share of exact zeros among the penalised entries."""
    penalised = weight > 0
    return float((x[penalised] == 0).double().mean()) if bool(penalised.any()) else 0.0


def run(spec=None, data="pinn", *, hierarchy: str = "width", levels: int = 2, beta: float = 1e-4, l1="weights",
        gtol: float = 1e-4, max_iterations: int = 200, loss: str = "cross_entropy", warmup: int = 0,
        warmup_lr: float = 1e-2, model: str = "hessian", pairing: str = "adjacent", coarse_scaling: str = "orthonormal",
        dtype: torch.dtype | str = torch.float64, seed: int = 0, out=None, progress: bool = False, export: bool = True,
        hierarchy_options: dict | None = None, checkpoint_every: int | None = None, resume=None, **config) -> RMNTRRun:
    """Minimise f + beta ||.||_1 for the network ``spec`` on ``data`` with RMNTR on a ``levels``-level
    ``hierarchy`` (width: neuron pairs, orthonormal; depth: ResNet stages, injection); levels=1
    is the single-level proximal trust-region method. ``model='gauss-newton'`` uses matrix-free
    Gauss-Newton products instead of Hessian products (least-squares losses: the PINN);
    ``model='levenberg-marquardt'`` is the smooth member (beta = 0): Gauss-Newton products,
    regularised steps lam/2 ||s||^2 with the trust-region-style lam update instead of a radius.
    ``pairing='gradient'`` pairs the most strongly connected units (residual gradients) instead
    of adjacent ones; ``coarse_scaling='average'`` lets the coarse networks evaluate average-scaled
    weights (function-preserving for pairs of equal units, ``levels.average_scales``). ``config`` sets :class:`RMNTRConfig` fields (radius, lm_lambda, kappa_h,
    coarse_iterations, spg_iterations, ...). With ``out`` the run directory gets log.jsonl (every
    step on every level), summary.json, final.yaml + .pt, model.pt2, progress.png, sparsity.png
    and checkpoints/ (every ``checkpoint_every`` finest-level iterations, default every one, and at SIGINT/SIGTERM,
    which then raise RunInterrupted); ``resume=RUNDIR`` continues an interrupted run from its
    latest checkpoint with its own options and ends where the uninterrupted run would have."""
    options = {name: value for name, value in locals().items()
               if name not in ("spec", "out", "progress", "resume", "config")}
    options.update(config)
    if resume is None:
        if spec is None:
            raise GraphgrowError("rmntr needs a spec",
                                 hint="give a spec, or --resume RUNDIR (resume=RUNDIR) to continue an interrupted run")
        network = load_network(spec, seed)
        network.module.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        return _run(network, options, str(getattr(network.graph, "source", None) or network.graph.name), out,
                    progress)
    checkpoint, saved = resume_run("rmntr", run, options, spec, out, resume)
    return _run(restored_network(checkpoint, checkpoint.state["weights"]), saved, checkpoint.meta["spec"], resume,
                progress, checkpoint)


def _run(network, o: dict, spec_name: str, out, progress: bool, checkpoint=None) -> RMNTRRun:
    """Run (or, with ``checkpoint``, continue from it) the method with ``o`` (run's keywords);
    ``network`` is the start (after the warm-up when resuming)."""
    from .plots import plot_progress, plot_sparsity

    data, hierarchy, beta, l1, model, max_iterations, seed = (o[k] for k in (
        "data", "hierarchy", "beta", "l1", "model", "max_iterations", "seed"))
    config = {k: v for k, v in o.items() if k not in RUN_OPTIONS}
    unknown = set(config) - set(RMNTRConfig.__dataclass_fields__)
    if unknown:
        raise GraphgrowError(f"unknown rmntr option {sorted(unknown)[0]!r}",
                             hint=f"options: {', '.join(RMNTRConfig.__dataclass_fields__)}")
    if model == "levenberg-marquardt":
        config["globalisation"], model = model, "gauss-newton"
    settings = RMNTRConfig(gtol=o["gtol"], max_iterations=max_iterations, **config)
    problem = make_problem(network, data, seed, o["loss"])
    weight = l1_weights(network, beta, l1)
    if o["warmup"] and checkpoint is None:
        fine = build_levels(network, problem, hierarchy, 1)[0]
        fine.vector.load(network, adam_warmup(fine.objective, fine.vector.of(network), o["warmup"], o["warmup_lr"]))
    start_weights = {name: value.detach().clone() for name, value in network.state().items()}
    built = build_levels(network, problem, hierarchy, o["levels"], model, o["pairing"], o["coarse_scaling"],
                         **(o["hierarchy_options"] or {}))
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=max_iterations, initial=checkpoint.meta["step"] if checkpoint else 0,
                   desc=f"rmntr x{o['levels']}", unit="it", leave=False, dynamic_ncols=True)
    checkpointer = None
    if out is not None:
        checkpointer = Checkpointer(out, "rmntr", {"options": saved_options(o), "spec": spec_name,
                                                   "placement": placement(network)}, every=o["checkpoint_every"] or 1)
    log = RunLog(out, resume=None if checkpoint is None else checkpoint.state["log_length"])
    with log, (checkpointer.interrupt.installed() if checkpointer else nullcontext()):
        if checkpoint is None:
            log.log("start", config=settings.to_dict(), hierarchy=hierarchy, levels=[lv.name for lv in built],
                    costs=[lv.cost for lv in built], model=o["model"], pairing=o["pairing"],
                    coarse_scaling=o["coarse_scaling"],
                    network=network.graph.name, data=str(data), beta=beta,
                    l1=l1 if isinstance(l1, str) else list(l1), warmup=o["warmup"], seed=seed)
        else:
            for name, reason in checkpoint.skipped:
                log.log("checkpoint_skipped", checkpoint=name, reason=reason)
            torch.set_rng_state(checkpoint.state["torch_rng"])
            log.log("resume", checkpoint=checkpoint.directory.name, iteration=checkpoint.meta["step"])

        def on_step(record):
            log.log("step", **{k: v for k, v in record.items() if k != "event"})
            if bar is not None and record["level"] == 0:
                bar.update(1)
                bar.set_postfix(F=f"{record['F']:.3e}", h=f"{record['h']:.1e}", refresh=False)

        def on_iteration(state):
            def save():
                # the checkpointer adds the torch RNG state
                return checkpointer.write(state["loop"]["iteration"], network.graph,
                                          lambda: {"weights": start_weights, "method": state,
                                                   "log_length": len(log.records)})
            checkpointer.stop_if_interrupted(log, save, iteration=state["loop"]["iteration"])
            if checkpointer.due(state["loop"]["iteration"]):
                save()
        method = RMNTR(built, weight, settings, on_step, on_iteration if checkpointer is not None else None)
        began = time.perf_counter() - (checkpoint.state["method"]["elapsed"] if checkpoint else 0.0)
        try:
            result = method.minimize(built[0].vector.of(network), checkpoint.state["method"] if checkpoint else None)
        finally:
            if bar is not None:
                bar.close()
        seconds = time.perf_counter() - began
        built[0].vector.load(network, result.x)
        counts = built[0].counts
        final = {"iterations": result.iterations, "reason": result.reason, "F": result.value, "h": result.h,
                 "fine_gradients": counts.gradients, "fine_hvps": counts.hvps, "fine_values": counts.values,
                 "work": method.work(), "fine_work": counts.work(), "seconds": seconds,
                 "zero_share": sparsity(result.x, weight),
                 "coarse_tried": method.coarse_tried[1:], "coarse_accepted": method.coarse_accepted[1:],
                 "coarse_declined": method.coarse_declined[1:], "coarse_empty": method.coarse_empty[1:]}
        if isinstance(problem, PoissonPINN):
            final.update(problem.metrics(network.module, built[0].vector.unflatten(result.x)))
        log.log("end", **final)
        summary = {"spec": spec_name, "data": str(data), "model": o["model"],
                   "hierarchy": hierarchy, "levels": [lv.name for lv in built], "beta": beta,
                   "config": settings.to_dict(), "final": final}
        if out is not None:
            log.save_network(network)
            if o["export"]:
                log.export(network)
            title = f"{network.graph.name}: RMNTR, {hierarchy} x{len(built)}, beta {beta:g}"
            plot_progress({f"{len(built)} level(s)": log.records}, log.path("progress.png"), title)
            weights = built[0].vector.unflatten(weight)
            plot_sparsity({n: p.detach().cpu().numpy() for n, p in built[0].vector.unflatten(result.x).items()
                           if bool((weights[n] > 0).any())}, log.path("sparsity.png"), title)
            log.write_json("summary.json", summary)
    return RMNTRRun(network, result, summary, log.records, out)


#: run's own keywords; every other one is an RMNTRConfig field
RUN_OPTIONS = {"data", "hierarchy", "levels", "beta", "l1", "gtol", "max_iterations", "loss", "warmup", "warmup_lr",
               "model", "pairing", "coarse_scaling", "dtype", "seed", "export", "hierarchy_options", "checkpoint_every"}
