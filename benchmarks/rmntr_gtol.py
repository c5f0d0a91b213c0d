"""RMNTR on the PINN run to gtol (or a work cap): single level against two levels, and the
Levenberg-Marquardt member, each as a resumable run directory.

    PYTHONPATH=. python benchmarks/rmntr_gtol.py run  --root runs/gtol [--cap 8000] [--only NAME ...]
    PYTHONPATH=. python benchmarks/rmntr_gtol.py table --root runs/gtol [--plots benchmarks/reports/rmntr]

``run`` starts (or, when a directory holds an interrupted run, resumes) every contender in turn,
one process, one thread: ``graphgrow.rmntr.run`` on specs/pinn_60.yaml with the same seed and
200 Adam warm-up steps, gtol 1e-4, and ``max_work`` = the cap in fine-gradient units (a value 0.5,
a gradient 1, an HVP 2, the coarse level at half the cost). ``table`` reads the run directories
(also unfinished ones, from their logs) and prints the table of benchmarks/reports/rmntr.md:
work to reach h <= 1e-2, 1e-3, 1e-4, final F, h, fine and total work, coarse steps tried /
accepted, median rho of the coarse steps; and plots h against work.
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "specs" / "pinn_60.yaml"
AT = (1000.0, 2500.0)   # the table also gives F and h at these work budgets
COMMON = dict(gtol=1e-4, warmup=200, max_iterations=10 ** 6, export=False)
CONTENDERS = {   # in the order they run
    "tr2-average": dict(levels=2, beta=1e-4, coarse_scaling="average"),
    "tr2-rescaled": dict(levels=2, beta=1e-4, rescale_coarse_steps=True),
    "tr1": dict(levels=1, beta=1e-4),
    "tr2": dict(levels=2, beta=1e-4),
    "lm1": dict(levels=1, beta=0.0, model="levenberg-marquardt"),
    "lm2": dict(levels=2, beta=0.0, model="levenberg-marquardt"),
    "tr2-gradient": dict(levels=2, beta=1e-4, pairing="gradient"),
    "gn1": dict(levels=1, beta=1e-4, model="gauss-newton"),
    "gn2": dict(levels=2, beta=1e-4, model="gauss-newton"),
    "lm-vs-gn1": dict(levels=1, beta=0.0, model="gauss-newton"),   # the LM member's problem, trust-region rules
    "lm2-average": dict(levels=2, beta=0.0, model="levenberg-marquardt", coarse_scaling="average"),
}


def read(rundir: Path) -> list[dict]:
    lines = (rundir / "log.jsonl").read_text().splitlines()
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:   # a last line cut short
            pass
    return out


def run_all(root: Path, cap: float, only) -> None:
    from graphgrow.rmntr import run
    torch.set_num_threads(1)
    for name, options in CONTENDERS.items():
        if only and name not in only:
            continue
        rundir = root / name
        if (rundir / "summary.json").exists():
            continue
        if (rundir / "checkpoints").exists():
            result = run(resume=rundir)
        else:
            result = run(str(SPEC), "pinn", out=rundir, max_work=cap, **COMMON, **options)
        print(name, json.dumps(result.summary["final"]), flush=True)


def row(name: str, records: list[dict]) -> dict:
    steps = [r for r in records if r["event"] == "step" and r["level"] == 0]
    end = next((r for r in records if r["event"] == "end"), None)
    last = steps[-1]
    points = steps + ([end] if end else [])   # the end record has the final h
    first = {t: next((r["work"] for r in points if r["h"] <= t), None) for t in (1e-2, 1e-3, 1e-4)}
    rho = [r["rho"] for r in steps if r["kind"] == "recursive" and r["rho"] is not None]
    return {"name": name, "iterations": len(steps), "F": end["F"] if end else last["F"],
            "h": end["h"] if end else last["h"], "work": end["work"] if end else last["work"],
            "fine_work": end["fine_work"] if end else None, "reason": end["reason"] if end else "running",
            "l2_error": end.get("l2_error") if end else None,
            "coarse": (sum(r["kind"] == "recursive" for r in steps),
                       sum(r["kind"] == "recursive" and r["accepted"] for r in steps)),
            "median_rho_coarse": statistics.median(rho) if rho else None, "work_to": first,
            "at": {w: next(((r["F"], r["h"]) for r in reversed(steps) if r["work"] <= w), None)
                   if last["work"] >= w else None for w in AT}}


def table(root: Path, plots: Path | None) -> None:
    rows, logs = [], {}
    for name in CONTENDERS:
        rundir = root / name
        if (rundir / "log.jsonl").exists():
            records = read(rundir)
            if any(r["event"] == "step" for r in records):
                rows.append(row(name, records))
                logs[name] = records
    fmt = lambda v: "–" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))   # noqa: E731
    print("| run | iterations | reason | work | fine work | F | h | L2 error | coarse tried / accepted | "
          "median ρ coarse | work to h ≤ 1e-2 | 1e-3 | 1e-4 | " + " | ".join(f"F, h at work {w:g}" for w in AT) + " |")
    print("|---" * (13 + len(AT)) + "|")
    for r in rows:
        print(f"| {r['name']} | {r['iterations']} | {r['reason']} | {fmt(r['work'])} | {fmt(r['fine_work'])} | "
              f"{fmt(r['F'])} | {fmt(r['h'])} | {fmt(r['l2_error'])} | {r['coarse'][0]} / {r['coarse'][1]} | "
              f"{fmt(r['median_rho_coarse'])} | " + " | ".join(fmt(v) for v in r["work_to"].values()) + " | "
              + " | ".join("–" if v is None else f"{v[0]:.3g}, {v[1]:.2g}" for v in r["at"].values()) + " |")
    if plots is not None:
        from graphgrow.rmntr.plots import plot_progress
        for group, prefixes in (("tr", ("tr", "gn")), ("lm", ("lm",))):
            chosen = {n: logs[n] for n in logs if n.startswith(prefixes)}
            if chosen:
                plot_progress(chosen, plots / f"gtol_{group}.png", f"PINN [2,60,1] to gtol 1e-4: {group}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "table"))
    parser.add_argument("--root", default="runs/gtol")
    parser.add_argument("--cap", type=float, default=8000.0, help="work cap per run (fine-gradient units)")
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--plots", default=None)
    opts = parser.parse_args()
    root = Path(opts.root)
    if opts.action == "run":
        run_all(root, opts.cap, opts.only)
    else:
        table(root, Path(opts.plots) if opts.plots else None)


if __name__ == "__main__":
    main()
