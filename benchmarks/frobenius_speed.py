"""Step time of the Frobenius-type preconditioner against plain SGD measured in the same run.

Network 784-100-100-100-10 (ReLU), batch 100, MNIST 10k test set, one thread. Methods are run
interleaved in blocks of steps, repeated; the report gives the median step time per method and its
ratio to the median SGD step time. It also counts the floating-point operations of a step (matrix
products by torch's FlopCounterMode, plus Cholesky factorisations and inversions), averaged over 20
steps so that every-K-steps refreshes are included: a floor for the time ratio if the
preconditioner's arithmetic ran as fast per operation as the SGD step's.

    PYTHONPATH=. python benchmarks/frobenius_speed.py --mnist /work/shared/data/mnist
    PYTHONPATH=. python benchmarks/frobenius_speed.py --methods batch-woodbury ema-every-10   # quicker
    git show 0f7e8f6:graphgrow/frobenius.py  # (before the layout change; after it: graphgrow/precond/frobenius.py) > /tmp/frobenius_before.py   # an earlier version, timed alongside
    PYTHONPATH=. python benchmarks/frobenius_speed.py --methods batch-woodbury ema-every-10 \
        --reference-code /tmp/frobenius_before.py --repeats 12 --steps 20
"""
import argparse
import importlib.util
import os
import statistics
import sys
import time
import warnings

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula

from graphgrow.runtime.data import mnist
from graphgrow.precond import FrobeniusPreconditioner


METHODS = ["sgd", "batch-woodbury", "batch-dense", "batch-woodbury-sampled", "ema-every-10", "backpack-kfac"]


def relu_classifier(seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 100), nn.ReLU(),
                         nn.Linear(100, 100), nn.ReLU(), nn.Linear(100, 10))


def load_reference(path):
    """FrobeniusPreconditioner from another version of graphgrow/precond/frobenius.py (a file path)."""
    spec = importlib.util.spec_from_file_location("frobenius_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.FrobeniusPreconditioner


def build(method, preconditioner=FrobeniusPreconditioner):
    """(model, optimizer, loss, backward function); small preconditioned lr so no run diverges."""
    model = relu_classifier(0)
    loss_fn = nn.CrossEntropyLoss()
    backward = lambda loss: loss.backward()  # noqa: E731
    if method == "sgd":
        return model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, backward
    if method == "backpack-kfac":
        from backpack import backpack, extend
        model, loss_fn = extend(model, use_converter=True), extend(loss_fn)
        optimizer = FrobeniusPreconditioner(model, lr=1e-3, backend="backpack", labels="sampled", woodbury=False)

        def backward(loss):
            with backpack(*optimizer.backpack_extensions()):
                loss.backward()
        return model, optimizer, loss_fn, backward
    options = {
        "batch-woodbury": dict(estimate="batch"),
        "batch-dense": dict(estimate="batch", woodbury=False),
        "batch-woodbury-sampled": dict(estimate="batch", labels="sampled", loss=loss_fn),
        "ema-every-10": dict(estimate="ema", update_interval=10),
    }[method]
    return model, preconditioner(model, lr=1e-3, damping_in=0.01, damping_out=0.01, **options), loss_fn, backward


@register_flop_formula(torch.ops.aten.linalg_cholesky_ex)
def cholesky_flops(matrix_shape, *args, **kwargs):
    return matrix_shape[:-2].numel() * matrix_shape[-1] ** 3 // 3


@register_flop_formula(torch.ops.aten.cholesky_inverse)
def cholesky_inverse_flops(factor_shape, *args, **kwargs):
    """L⁻¹ and then L⁻ᵀ L⁻¹, n³/3 each."""
    return 2 * factor_shape[:-2].numel() * factor_shape[-1] ** 3 // 3


class FlopCounter(TorchDispatchMode):
    """Adds up torch's registered FLOP formulas over every op dispatched. FlopCounterMode itself
    also tracks modules with backward hooks, which fail under the re-entrant autograd.grad of
    Monte-Carlo label sampling."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out


def flops_per_step(run, batches, steps=20):
    """Mean floating-point operations of a training step (forward, backward, optimizer step)."""
    model, optimizer, loss_fn, backward = run
    with FlopCounter() as counter:
        for x, y in batches[:steps]:
            optimizer.zero_grad()
            backward(loss_fn(model(x), y))
            optimizer.step()
    return counter.total / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="/work/shared/data/mnist")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed block")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="contenders to time (SGD, the baseline, is always included)")
    parser.add_argument("--reference-code", help="another version of graphgrow/precond/frobenius.py: its hooks-backend "
                                                 "contenders are timed alongside, as '<method> (reference)'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    data = mnist(args.mnist, split=(8000, 2000), seed=0)
    batches = [(data.x_train[i:i + 100], data.y_train[i:i + 100]) for i in range(0, 8000, 100)]
    methods = ["sgd"] + [m for m in args.methods if m != "sgd"]
    runs = {m: build(m) for m in methods}
    if args.reference_code:
        reference = load_reference(args.reference_code)
        for method in [m for m in methods if m not in ("sgd", "backpack-kfac")]:
            runs[f"{method} (reference)"] = build(method, reference)
    times = {m: [] for m in runs}
    for repeat in range(args.repeats + 1):  # the first round warms up and is discarded
        for method, (model, optimizer, loss_fn, backward) in runs.items():
            start = time.perf_counter()
            for step in range(args.steps):
                x, y = batches[(repeat * args.steps + step) % len(batches)]
                optimizer.zero_grad()
                backward(loss_fn(model(x), y))
                optimizer.step()
            if repeat:
                times[method].append((time.perf_counter() - start) / args.steps)
    baseline = statistics.median(times["sgd"])
    flops = {method: flops_per_step(run, batches) for method, run in runs.items()}
    print(f"load average after the run (1, 5, 15 min): {os.getloadavg()}")
    print("| method | median step (ms) | ratio to SGD | MFLOP per step | FLOP ratio to SGD |\n|---|---|---|---|---|")
    for method in runs:
        median = statistics.median(times[method])
        print(f"| {method} | {1000 * median:.2f} | {median / baseline:.2f}x | {flops[method] / 1e6:.1f} "
              f"| {flops[method] / flops['sgd']:.2f}x |")


if __name__ == "__main__":
    main()
