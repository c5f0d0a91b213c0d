"""RMNTR on the PINN of docs/rmntr.md: single-level proximal trust region, two-level RMNTR,
Adam + soft-thresholding and L-BFGS on f, from one seeded start after the same Adam warm-up.

    PYTHONPATH=. python benchmarks/rmntr_pinn.py [--betas 1e-8 1e-4 1e-3] [--budget 300] [--width 60]

Every contender gets the same work budget in fine-gradient units (RMNTR's ledger: a value 0.5,
a gradient 1, an HVP 2, coarse levels scaled by their FLOPs; Adam and L-BFGS: one gradient per
evaluation). The table lists iterations, fine gradients and HVPs, work, wall time, final F and h,
L2 relative error to u*, residual RMSE, share of zero weights, coarse steps tried/accepted and
why recursions gave no step; and the work at which h first fell below 1e-2 and 1e-3. The plots
(F and h against iterations, work and time; sparsity) go to benchmarks/reports/rmntr/.
One thread, contenders interleaved per beta, one repetition (counts are deterministic; times
are from a shared machine).
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path

import torch

from graphgrow.compiler.io import load_network
from graphgrow.rmntr import L1Term, PoissonPINN, RMNTR, RMNTRConfig, adam_warmup, build_levels, l1_weights, stationarity
from graphgrow.rmntr.plots import plot_progress, plot_sparsity
from graphgrow.rmntr.prox import soft_threshold
from graphgrow.rmntr.run import sparsity

ROOT = Path(__file__).resolve().parent.parent
REPORTS = ROOT / "benchmarks" / "reports" / "rmntr"


def summarize(name, levels, problem, x, weight, records, seconds, extra):
    fine = levels[0]
    lin = fine.objective.linearize(x)
    phi = L1Term.fine(weight)
    metrics = problem.metrics(fine.network.module, fine.vector.unflatten(x))
    first = {}
    for threshold in (1e-2, 1e-3, 1e-4):
        hit = next((r["work"] for r in records if r.get("level", 0) == 0 and r["h"] <= threshold), None)
        first[f"work_h<={threshold:g}"] = hit
    return {"method": name, "F": lin.value + phi.value(x), "h": stationarity(phi, x, lin.gradient),
            "seconds": seconds, "zero_share": sparsity(x, weight), **metrics, **first, **extra}


def run_rmntr(network, problem, weight, nlevels, budget, config, pairing="adjacent"):
    levels = build_levels(copy.deepcopy(network), problem, "width", nlevels, pairing=pairing)
    method = RMNTR(levels, weight, RMNTRConfig(max_work=budget, **config))
    began = time.perf_counter()
    result = method.minimize(levels[0].vector.of(levels[0].network))
    seconds = time.perf_counter() - began
    fine = levels[0].counts
    rho = {kind: [r["rho"] for r in result.records if r["level"] == 0 and r["kind"] == kind and r["rho"] is not None]
           for kind in ("taylor", "recursive")}
    extra = {"iterations": sum(r["level"] == 0 for r in result.records), "fine_gradients": fine.gradients,
             "fine_hvps": fine.hvps, "work": method.work(), "fine_work": fine.work(), "coarse_tried": method.coarse_tried[1:],
             "coarse_accepted": method.coarse_accepted[1:], "coarse_declined": method.coarse_declined[1:],
             "coarse_empty": method.coarse_empty[1:], "reason": result.reason,
             "median_rho": {kind: statistics.median(values) if values else None for kind, values in rho.items()},
             "median_step": statistics.median([r["step_norm"] for r in result.records if r["level"] == 0] or [0.0])}
    return levels, result.x, result.records, seconds, extra


def run_first_order(network, problem, weight, budget, kind, lr):
    """Adam + soft-thresholding (threshold lr * beta after every Adam step) or L-BFGS on f alone;
    one record per gradient evaluation (h with the l1 term for both)."""
    levels = build_levels(copy.deepcopy(network), problem, "width", 1)
    fine = levels[0]
    phi = L1Term.fine(weight)
    leaf = fine.vector.of(fine.network).clone().requires_grad_(True)
    records, began = [], time.perf_counter()

    def evaluate():
        loss = fine.objective.function(leaf)
        gradient, = torch.autograd.grad(loss, leaf)
        records.append({"level": 0, "iteration": len(records) + 1, "kind": kind, "accepted": True,
                        "F": float(loss.detach()) + phi.value(leaf.detach()),
                        "h": stationarity(phi, leaf.detach(), gradient), "work": float(len(records) + 1),
                        "elapsed": time.perf_counter() - began, "event": "step"})
        return loss, gradient
    if kind == "adam":
        optimizer = torch.optim.Adam([leaf], lr=lr)
        while len(records) < budget:
            optimizer.zero_grad()
            loss, leaf.grad = evaluate()
            optimizer.step()
            with torch.no_grad():
                leaf.copy_(soft_threshold(leaf, lr * weight))
    else:
        optimizer = torch.optim.LBFGS([leaf], lr=1.0, max_iter=int(budget), max_eval=int(budget), history_size=20,
                                      tolerance_grad=0.0, tolerance_change=0.0, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            loss, leaf.grad = evaluate()
            return loss
        optimizer.step(closure)
    seconds = time.perf_counter() - began
    extra = {"iterations": len(records), "fine_gradients": len(records), "fine_hvps": 0, "work": float(len(records)),
             "fine_work": float(len(records)),
             "coarse_tried": [], "coarse_accepted": [], "coarse_declined": [], "coarse_empty": [], "reason": "budget"}
    return levels, leaf.detach(), records, seconds, extra


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--betas", type=float, nargs="+", default=[1e-8, 1e-4, 1e-3])
    parser.add_argument("--budget", type=float, default=800.0, help="work per contender (fine gradients)")
    parser.add_argument("--width", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=200, help="Adam steps (lr 1e-2) before every contender")
    parser.add_argument("--adam-lr", type=float, default=1e-3)
    parser.add_argument("--kappa-h", type=float, default=0.5)
    parser.add_argument("--spg-iterations", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="write the rows here")
    parser.add_argument("--plots", default=str(REPORTS), help="folder for the plots")
    parser.add_argument("--only", default=None, help="run only the contenders whose name contains this")
    opts = parser.parse_args()
    torch.set_num_threads(1)

    from graphgrow.ir import load_graph
    text_graph = load_graph(ROOT / "specs" / "pinn_60.yaml")
    if opts.width != 60:
        from graphgrow.ir import graph_from_text
        text_graph = graph_from_text((ROOT / "specs" / "pinn_60.yaml").read_text().replace("width: 60", f"width: {opts.width}"))
    network = load_network(text_graph, opts.seed)
    network.module.to(torch.float64)
    problem = PoissonPINN()
    start = build_levels(network, problem, "width", 1)[0]
    start.vector.load(network, adam_warmup(start.objective, start.vector.of(network), opts.warmup, 1e-2))
    # how good a model of f the coarse network is at the restricted start (first-order coherence
    # corrects the gradient, not the value or the curvature)
    pair = build_levels(copy.deepcopy(network), problem, "width", 2)
    x_start = pair[0].vector.of(pair[0].network)
    print(json.dumps({"f_fine_start": pair[0].objective.value(x_start),
                      "f_coarse_at_R_start": pair[1].objective.value(pair[0].restriction.restrict(x_start))}))
    config = {"gtol": 1e-4, "max_iterations": 10 ** 6, "kappa_h": opts.kappa_h, "spg_iterations": opts.spg_iterations}
    rows = []
    plots = Path(opts.plots)
    plots.mkdir(parents=True, exist_ok=True)
    for beta in opts.betas:
        weight = l1_weights(network, beta, "weights")
        contenders = {
            "prox TR, 1 level": lambda: run_rmntr(network, problem, weight, 1, opts.budget, config),
            "RMNTR, 2 levels": lambda: run_rmntr(network, problem, weight, 2, opts.budget, config),
            "RMNTR, 2 levels, gradient pairs": lambda: run_rmntr(network, problem, weight, 2, opts.budget, config,
                                                                 "gradient"),
            "Adam + soft-threshold": lambda: run_first_order(network, problem, weight, opts.budget, "adam", opts.adam_lr),
            "L-BFGS on f": lambda: run_first_order(network, problem, weight, opts.budget, "lbfgs", 1.0),
        }
        logs, finals = {}, {}
        for name, contender in contenders.items():
            if opts.only and opts.only not in name:
                continue
            levels, x, records, seconds, extra = contender()
            row = {"beta": beta, **summarize(name, levels, problem, x, weight, records, seconds, extra)}
            rows.append(row)
            logs[name] = records
            finals[name] = {n: v.detach().numpy() for n, v in levels[0].vector.unflatten(x).items() if n.endswith(".weight")}
            print(json.dumps(row), flush=True)
        plot_progress(logs, plots / f"progress_beta{beta:g}.png", f"PINN [2,{opts.width},1], beta {beta:g}")
        if "RMNTR, 2 levels" in finals:
            plot_sparsity(finals["RMNTR, 2 levels"], plots / f"sparsity_rmntr2_beta{beta:g}.png",
                          f"RMNTR 2 levels, beta {beta:g}")
    if opts.json:
        Path(opts.json).write_text(json.dumps(rows, indent=1))
    columns = ("beta", "method", "iterations", "fine_gradients", "fine_hvps", "fine_work", "work", "seconds", "F", "h", "l2_error",
               "residual_rmse", "zero_share", "coarse_tried", "coarse_accepted", "work_h<=0.01", "work_h<=0.001")
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(f"{row[c]:.3g}" if isinstance(row[c], float) else str(row[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
