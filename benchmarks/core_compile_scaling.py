"""Load (read YAML + build IR with shape inference) and compile time for generated chains.

Chains alternate `linear (out 16)` and `relu`; each size is written to a spec file, then loaded
and compiled `--repeats` times (sizes interleaved); medians are reported, as wall-clock time and
as this process's CPU time (time.process_time), which is what wall time would be on an idle
machine when other jobs share the cores.

    PYTHONPATH=. python benchmarks/core_compile_scaling.py [--sizes 10 100 1000] [--repeats 7]
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from graphgrow.compiler import compile_graph
from graphgrow.ir import load_graph
from chains import chain_spec


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--repeats", type=int, default=7)
    opts = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        paths = {n: Path(tmp) / f"chain{n}.yaml" for n in opts.sizes}
        for n, path in paths.items():
            path.write_text(chain_spec(n))
        load_graph(paths[opts.sizes[0]])  # warm imports
        load_s = {n: [] for n in opts.sizes}
        compile_s = {n: [] for n in opts.sizes}
        cpu_s = {n: [] for n in opts.sizes}
        for _ in range(opts.repeats):
            for n in opts.sizes:
                cpu_start, start = time.process_time(), time.perf_counter()
                graph = load_graph(paths[n])
                loaded = time.perf_counter()
                module = compile_graph(graph, seed=0)
                done, cpu_done = time.perf_counter(), time.process_time()
                assert len(graph) == n and len(list(module.graph.nodes)) == n + 2
                load_s[n].append(loaded - start)
                compile_s[n].append(done - loaded)
                cpu_s[n].append(cpu_done - cpu_start)
    print(f"torch {torch.__version__}, threads 1, {opts.repeats} repeats (interleaved), medians; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
    print("| layers | load s (wall) | compile s (wall) | load + compile s (wall) | load + compile s (CPU) "
          "| CPU ms per layer |")
    print("|---|---|---|---|---|---|")
    for n in opts.sizes:
        load, comp = statistics.median(load_s[n]), statistics.median(compile_s[n])
        total = statistics.median([a + b for a, b in zip(load_s[n], compile_s[n])])
        cpu = statistics.median(cpu_s[n])
        print(f"| {n} | {load:.4f} | {comp:.4f} | {total:.4f} | {cpu:.4f} | {1e3 * cpu / n:.3f} |")


if __name__ == "__main__":
    main()
