"""Step time of the Frobenius-type preconditioner against plain SGD measured in the same run.

Networks (``--network``): ``small`` 784-100-100-100-10 (ReLU) at batch 100 and ``wide`` 784-512-512-10
at batch 128, on the MNIST 10k test set, one thread. Methods are run interleaved in blocks of steps,
repeated; the report gives the median step time per method and its ratio to the median SGD step
time. It also counts the floating-point operations of a step (matrix products by torch's
FlopCounterMode, plus Cholesky factorisations and inversions), averaged over 20 steps so that
every-K-steps refreshes are included.

Contenders: the exact per-step method (batch estimate, true labels: the push-through fast path),
the same with ``grad="direction"`` (the direction formed in the backward pass in place of autograd's
weight gradient, ``exact-direction``), the same through the general path (``fast_path=False``),
Monte-Carlo labels, the amortised modes (batch estimate or exponential average refreshed every 10
steps, also with ``grad="direction"``: ``*-direction``), the issue's standalone prototype of the
direction in the backward pass (a custom autograd Linear in this file, dense inverses, no checks),
and as references
BackPACK's KFAC (+ the optimizer's Cholesky) and ASDL's K-FAC (``asdfghjkl`` 0.1a5, imported as
``asdl``; benchmark only, not a dependency of graphgrow: install it into the benchmark's own
environment, ``pip install asdfghjkl==0.1a5``; without it those rows are left out).

    PYTHONPATH=. python benchmarks/frobenius_speed.py --network small
    PYTHONPATH=. python benchmarks/frobenius_speed.py --network wide
    PYTHONPATH=. python benchmarks/frobenius_speed.py --methods exact ema-every-10   # quicker
    PYTHONPATH=. python benchmarks/frobenius_speed.py --clock cpu   # on a shared machine: CPU time, not wall
    git show 0f7e8f6:graphgrow/frobenius.py  # (before the layout change; after it: graphgrow/precond/frobenius.py) > /tmp/frobenius_before.py   # an earlier version, timed alongside
    PYTHONPATH=. python benchmarks/frobenius_speed.py --methods exact ema-every-10 \
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


METHODS = ["sgd", "exact", "exact-direction", "exact-general", "exact-sampled", "batch-every-10", "batch-every-10-direction",
           "ema-every-10", "ema-every-10-direction", "prototype",
           "backpack-kfac", "asdl-kfac", "asdl-kfac-every-10"]
NETWORKS = {"small": ([784, 100, 100, 100, 10], 100), "wide": ([784, 512, 512, 10], 128)}
DAMPING = 0.01


def classifier(widths, seed, linear=nn.Linear):
    torch.manual_seed(seed)
    layers = [nn.Flatten()]
    for index, (fan_in, fan_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(linear(fan_in, fan_out))
        if index < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def load_reference(path):
    """FrobeniusPreconditioner from another version of graphgrow/precond/frobenius.py (a file path)."""
    spec = importlib.util.spec_from_file_location("frobenius_reference", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module.FrobeniusPreconditioner


def _damped_inverse(matrix, damping):
    matrix.diagonal().add_(damping)
    return torch.cholesky_inverse(torch.linalg.cholesky(matrix))


class _PushThroughLinearFunction(torch.autograd.Function):
    """y = x Wᵀ + b whose backward leaves the update (5.15) of the batch estimate (second moment,
    true labels, mean loss) in the weight's and bias's gradient slots instead of the gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        return torch.addmm(bias, x, weight.T)

    @staticmethod
    def backward(ctx, grad_output):
        x, weight = ctx.saved_tensors
        batch = x.shape[0]
        # P_out Rᵀ with C_y = B·RᵀR: push-through Rᵀ (B·RRᵀ + γ)⁻¹ when out > B, else dense
        if grad_output.shape[1] > batch:
            left = grad_output.T @ _damped_inverse(batch * (grad_output @ grad_output.T), DAMPING)
        else:
            left = _damped_inverse(batch * (grad_output.T @ grad_output), DAMPING) @ grad_output.T
        # X P_in with C_x = XᵀX/B: (XXᵀ/B + γ)⁻¹ X when in > B, else dense
        if x.shape[1] > batch:
            direction = (left @ _damped_inverse(x @ x.T / batch, DAMPING)) @ x
        else:
            direction = (left @ x) @ _damped_inverse(x.T @ x / batch, DAMPING)
        grad_input = grad_output @ weight if ctx.needs_input_grad[0] else None
        return grad_input, direction, left.sum(1)


class PushThroughLinear(nn.Linear):
    def forward(self, x):
        return _PushThroughLinearFunction.apply(x, self.weight, self.bias)


def build(method, widths, preconditioner=FrobeniusPreconditioner):
    """A function (x, y) -> None that takes one training step; small preconditioned lr so that no
    run diverges (the learning rate does not change the cost of a step)."""
    loss_fn = nn.CrossEntropyLoss()
    model = classifier(widths, 0, PushThroughLinear if method == "prototype" else nn.Linear)
    if method.startswith("asdl"):
        from asdl import KfacGradientMaker, PreconditioningConfig
        interval = 10 if method.endswith("every-10") else 1
        config = PreconditioningConfig(data_size=1, damping=DAMPING, preconditioner_upd_interval=interval,
                                       curvature_upd_interval=interval)
        maker, optimizer = KfacGradientMaker(model, config), torch.optim.SGD(model.parameters(), lr=1e-3)

        def asdl_step(x, y):
            optimizer.zero_grad()
            dummy = maker.setup_model_call(model, x)
            maker.setup_loss_call(loss_fn, dummy, y)
            maker.forward_and_backward()
            optimizer.step()
        return asdl_step
    backward = lambda loss: loss.backward()  # noqa: E731
    if method in ("sgd", "prototype"):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1 if method == "sgd" else 1e-3)
    elif method == "backpack-kfac":
        from backpack import backpack, extend
        model, loss_fn = extend(model, use_converter=True), extend(loss_fn)
        optimizer = FrobeniusPreconditioner(model, lr=1e-3, backend="backpack", labels="sampled", woodbury=False)

        def backward(loss):
            with backpack(*optimizer.backpack_extensions()):
                loss.backward()
    else:
        options = {
            "exact": dict(estimate="batch"),
            "exact-direction": dict(estimate="batch", grad="direction"),
            "exact-general": dict(estimate="batch", fast_path=False),
            "exact-sampled": dict(estimate="batch", labels="sampled", loss=loss_fn),
            "batch-every-10": dict(estimate="batch", update_interval=10),
            "batch-every-10-direction": dict(estimate="batch", update_interval=10, grad="direction"),
            "ema-every-10": dict(estimate="ema", update_interval=10),
            "ema-every-10-direction": dict(estimate="ema", update_interval=10, grad="direction"),
        }[method]
        optimizer = preconditioner(model, lr=1e-3, damping_in=DAMPING, damping_out=DAMPING, **options)

    def train_step(x, y):
        optimizer.zero_grad()
        backward(loss_fn(model(x), y))
        optimizer.step()
    return train_step


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


def flops_per_step(train_step, batches, steps=20):
    """Mean floating-point operations of a training step (forward, backward, optimizer step)."""
    with FlopCounter() as counter:
        for x, y in batches[:steps]:
            train_step(x, y)
    return counter.total / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mnist", default="/work/shared/data/mnist")
    parser.add_argument("--network", choices=NETWORKS, default="small")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="steps per timed block")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS,
                        help="contenders to time (SGD, the baseline, is always included)")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="wall: time.perf_counter; cpu: the thread's CPU time (time.thread_time), which leaves "
                             "out the time the process waits for a core on a shared machine")
    parser.add_argument("--reference-code", help="another version of graphgrow/precond/frobenius.py: its hooks-backend "
                                                 "contenders are timed alongside, as '<method> (reference)'")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    widths, batch = NETWORKS[args.network]
    data = mnist(args.mnist, split=(8000, 2000), seed=0)
    batches = [(data.x_train[i:i + batch], data.y_train[i:i + batch]) for i in range(0, 8000 - batch + 1, batch)]
    methods = ["sgd"] + [m for m in args.methods if m != "sgd"]
    if any(m.startswith("asdl") for m in methods) and importlib.util.find_spec("asdl") is None:
        print("asdl (pip install asdfghjkl==0.1a5) is not installed: its rows are left out")
        methods = [m for m in methods if not m.startswith("asdl")]
    runs = {m: build(m, widths) for m in methods}
    if args.reference_code:
        reference = load_reference(args.reference_code)
        for method in [m for m in methods if m.startswith(("exact", "batch", "ema"))]:
            runs[f"{method} (reference)"] = build(method, widths, reference)
    clock = time.perf_counter if args.clock == "wall" else time.thread_time
    times = {m: [] for m in runs}
    for repeat in range(args.repeats + 1):  # the first round warms up and is discarded
        for method, train_step in runs.items():
            start = clock()
            for step in range(args.steps):
                train_step(*batches[(repeat * args.steps + step) % len(batches)])
            if repeat:
                times[method].append((clock() - start) / args.steps)
    baseline = statistics.median(times["sgd"])
    flops = {method: flops_per_step(train_step, batches) for method, train_step in runs.items()}
    print(f"network {args.network}: widths {widths}, batch {batch}; {args.clock} clock; load average after the run "
          f"(1, 5, 15 min): {os.getloadavg()}")
    print("| method | median step (ms) | ratio to SGD | MFLOP per step | FLOP ratio to SGD |\n|---|---|---|---|---|")
    for method in runs:
        median = statistics.median(times[method])
        print(f"| {method} | {1000 * median:.2f} | {median / baseline:.2f}x | {flops[method] / 1e6:.1f} "
              f"| {flops[method] / flops['sgd']:.2f}x |")


if __name__ == "__main__":
    main()
