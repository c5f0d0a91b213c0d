"""SensLI (thesis chapter 4) as a graph-level optimization: sensitivity-based layer insertion
and widening during training.

The engine builds the fully-extended network (passes.extend_all: identity candidates at every
legal position), reads the loss gradient with respect to every candidate weight over the
training data without changing any parameter (4.16), scores each candidate by a norm of that
gradient (4.17, B.1a-e), picks where to insert (argmax; or the comparisons random / smallest
merit / none), checks the threshold (4.18), inserts the chosen candidates (the inverse of
extend_all keeping them) and lets training go on with the optimizer state carried over.

Public entry points for the CLI: ``grow`` and ``sensitivities``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch.nn.grad import conv2d_input

from .errors import GraphgrowError

# -- norms of weight gradients (4.17, B.1a-e) -------------------------------------------------

#: merit norms: fro (4.17, B.1a), fro_width (4.17 scaled by 1/n^2, n the layer's output width),
#: fro_entries (B.1b, scaled by the number of entries), op (B.1c, squared operator norm of the
#: weight as a linear map on its actual input), op_out2 (B.1d), op_out1 (B.1e).
MERIT_NORMS = ("fro", "fro_width", "fro_entries", "op", "op_out2", "op_out1")


@dataclass(frozen=True)
class Geometry:
    """How a weight acts as a linear map: a convolution with kernel (out, in, k, k) on inputs
    of shape (in, H, W) with stride and zero padding. A linear weight (out, in) is the 1x1
    convolution on (in, 1, 1), so every norm has one definition for both."""
    input_shape: tuple[int, int, int]
    stride: int = 1
    padding: int = 0

    def as_kernel(self, weight: torch.Tensor) -> torch.Tensor:
        return weight if weight.dim() == 4 else weight.reshape(*weight.shape, 1, 1)

    @property
    def is_dense(self) -> bool:
        return self.input_shape[1:] == (1, 1)


def weight_geometry(node, role: str) -> Geometry | None:
    """The geometry of a node's weight role, or None for parameters that are not weight
    matrices or kernels (biases, normalisation scales)."""
    if node.op == "linear" and role == "weight":
        return Geometry((node.in_shapes[0][-1], 1, 1))
    if node.op == "conv2d" and role == "weight":
        from .ops.conv import Conv2dOp
        return Geometry(tuple(node.in_shapes[0]), node.args["stride"], Conv2dOp.padding(node.args))
    if node.op == "residual" and role in ("inner.weight", "outer.weight"):
        shape = node.in_shapes[0]
        if node.args["branch"] == "conv2d":
            return Geometry(tuple(shape), 1, node.args["kernel"] // 2)
        return Geometry((shape[-1], 1, 1))
    return None


def top_eigenvalue(matvec: Callable[[torch.Tensor], torch.Tensor], size: int, *, tol: float = 1e-5,
                   seed: int = 0) -> float:
    """Largest eigenvalue of a symmetric positive semi-definite operator by Lanczos with full
    reorthogonalisation; stops when the Ritz residual is below ``tol`` relative to the Ritz
    value (so the result is accurate to about ``tol``), at the latest after ``size`` steps
    (then exact up to rounding)."""
    generator = torch.Generator().manual_seed(seed)
    vector = torch.randn(size, generator=generator, dtype=torch.float64)
    basis = torch.empty(min(size, 64), size, dtype=torch.float64)  # rows: the Lanczos vectors
    basis[0] = vector / vector.norm()
    alphas: list[float] = []
    betas: list[float] = []
    theta = 0.0
    for step in range(size):
        w = matvec(basis[step])
        alphas.append(float(w @ basis[step]))
        done = basis[:step + 1]
        for _ in range(2):  # twice is enough to keep the basis orthogonal in floating point
            w = w - done.T @ (done @ w)
        beta = float(w.norm())
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if betas:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        values, vectors = torch.linalg.eigh(tridiagonal)
        theta = float(values[-1])
        residual = beta * abs(float(vectors[-1, -1]))
        if residual <= tol * max(theta, 0.0) or beta <= 1e-300 or step + 1 == size:
            break
        betas.append(beta)
        if step + 1 == basis.shape[0]:
            basis = torch.cat([basis, torch.empty_like(basis)])[:size]
        basis[step + 1] = w / beta
    return max(theta, 0.0)


def conv_operator_norm(kernel: torch.Tensor, input_shape: Sequence[int], stride: int = 1,
                       padding: int = 0, *, tol: float = 1e-5) -> float:
    """Largest singular value of the convolution with ``kernel`` (out, in, k, k) as a linear
    map on inputs of shape (in, H, W) with the given stride and zero padding (B.1c)."""
    kernel = kernel.detach().to(torch.float64)
    if kernel.shape[2:] == (1, 1) and tuple(input_shape[1:]) == (1, 1):
        return float(torch.linalg.matrix_norm(kernel[:, :, 0, 0], ord=2))
    if not torch.any(kernel):
        return 0.0
    shape = (1, *input_shape)
    size = math.prod(input_shape)

    def normal_matvec(vector):  # A^T A v, the adjoint by conv2d_input (transposed convolution)
        image = torch.nn.functional.conv2d(vector.reshape(shape), kernel, stride=stride, padding=padding)
        return conv2d_input(shape, kernel, image, stride=stride, padding=padding).reshape(-1)

    return math.sqrt(top_eigenvalue(normal_matvec, size, tol=tol))


def gradient_norm(grad: torch.Tensor, geometry: Geometry | None, norm: str = "fro") -> float:
    """Merit of a weight's gradient under ``norm`` (one of MERIT_NORMS); every value is a
    squared norm, as in (4.17) and (B.1a-e)."""
    grad = grad.detach().to(torch.float64)
    if norm == "fro":
        return float(grad.pow(2).sum())
    if norm == "fro_width":
        return float(grad.pow(2).sum()) / grad.shape[0] ** 2
    if norm == "fro_entries":
        return float(grad.pow(2).sum()) / grad.numel()
    if norm not in MERIT_NORMS:
        raise GraphgrowError(f"unknown merit norm '{norm}'", hint=f"use one of {', '.join(MERIT_NORMS)}")
    if geometry is None:
        raise GraphgrowError(f"norm '{norm}' needs a weight matrix or kernel", hint="use 'fro'")
    kernel = geometry.as_kernel(grad)
    if norm == "op":
        return conv_operator_norm(kernel, geometry.input_shape, geometry.stride, geometry.padding) ** 2
    # B.1d/e: per output channel, the single-channel kernel summed over input channels
    channel_shape = (1, *geometry.input_shape[1:])
    per_output = [conv_operator_norm(summed.reshape(1, 1, *summed.shape), channel_shape,
                                     geometry.stride, geometry.padding)
                  for summed in kernel.sum(dim=1)]
    if norm == "op_out2":
        return sum(value ** 2 for value in per_output)
    return sum(per_output) ** 2


# -- gradients over the data (4.16) -------------------------------------------------------------

def full_data_gradients(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        names: Iterable[str], *, batch: int | None = None) -> dict[str, torch.Tensor]:
    """Gradient of the mean loss over all of (x, y) with respect to the named parameters,
    accumulated over batches weighted by batch size (so unequal batches give the exact
    full-data gradient). No parameter, buffer or ``.grad`` changes: the module runs in eval
    mode (no batch-norm statistics updates, no dropout) and gradients come from
    ``torch.autograd.grad``."""
    params = dict(module.named_parameters())
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no parameters {missing}")
    targets = [params[n] for n in names]
    was_training = module.training
    # only the named parameters require gradients during the pass, so backward skips the
    # weight gradients of every other parameter (biases, normalisation, non-merit weights)
    flags = {name: p.requires_grad for name, p in params.items()}
    wanted = set(names)
    total = int(x.shape[0])
    step = total if batch is None else batch
    sums = [torch.zeros_like(p) for p in targets]
    module.eval()
    try:
        for name, p in params.items():
            p.requires_grad_(name in wanted)
        for start in range(0, total, step):
            xb, yb = x[start:start + step], y[start:start + step]
            value = loss(module(xb), yb) * (xb.shape[0] / total)
            for acc, grad in zip(sums, torch.autograd.grad(value, targets, allow_unused=True)):
                if grad is not None:
                    acc += grad
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
        module.train(was_training)
    return dict(zip(names, sums))


class _IdentityLayerGradient(torch.autograd.Function):
    """A linear or convolution layer whose weight is exactly the identity and bias zero: the
    output is the input, the input gradient is the output gradient, and only the weight and
    bias gradients are computed (one weight-gradient product instead of forward, input
    gradient and weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, layer):
        ctx.save_for_backward(x)
        ctx.layer = layer
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        (x,), layer = ctx.saved_tensors, ctx.layer
        weight_grad = bias_grad = None
        if ctx.needs_input_grad[1]:
            if isinstance(layer, torch.nn.Conv2d):
                weight_grad = torch.nn.grad.conv2d_weight(x, layer.weight.shape, grad, layer.stride, layer.padding,
                                                          layer.dilation, layer.groups)
            else:
                weight_grad = grad.reshape(-1, grad.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            channel = 1 if isinstance(layer, torch.nn.Conv2d) else grad.dim() - 1
            bias_grad = grad.sum(dim=tuple(d for d in range(grad.dim()) if d != channel))
        return grad, weight_grad, bias_grad, None


class _IdentityLayer(torch.nn.Module):
    """Stands in for an identity-initialised candidate layer during the gradient pass; holds
    the layer's own parameter objects, so parameter names and gradients are unchanged."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.weight, self.bias = layer.weight, layer.bias
        self.layer = [layer]  # a list: not registered as a submodule (no second parameter path)

    def forward(self, x):
        return _IdentityLayerGradient.apply(x, self.weight, self.bias, self.layer[0])


def _is_identity_layer(layer: torch.nn.Module | None) -> bool:
    """Whether ``layer`` computes exactly its input: a square linear layer with weight I, or a
    stride-1 'same' convolution with the Dirac kernel; bias zero or absent."""
    if isinstance(layer, torch.nn.Linear):
        weight = layer.weight.detach()
        identity = weight.shape[0] == weight.shape[1] and torch.equal(weight, torch.eye(len(weight), dtype=weight.dtype))
    elif isinstance(layer, torch.nn.Conv2d):
        weight, kernel = layer.weight.detach(), layer.kernel_size
        identity = (layer.groups == 1 and layer.stride == (1, 1) and layer.dilation == (1, 1)
                    and kernel[0] % 2 == 1 and kernel[1] % 2 == 1 and layer.padding == (kernel[0] // 2, kernel[1] // 2)
                    and weight.shape[0] == weight.shape[1]
                    and torch.equal(weight, torch.nn.init.dirac_(torch.empty_like(weight))))
    else:
        return False
    return identity and (layer.bias is None or not torch.any(layer.bias.detach()))


class identity_shortcuts:
    """Context manager: the identity layers among the named submodules of ``module`` compute
    only their parameter gradients (see _IdentityLayerGradient) while it is active. The
    gradients are those of the original layers; the forward values are identical."""

    def __init__(self, module: torch.nn.Module, names: Iterable[str]):
        self.module = module
        self.originals = {name: getattr(module, name) for name in names
                          if _is_identity_layer(getattr(module, name, None))}

    def __enter__(self):
        for name, layer in self.originals.items():
            setattr(self.module, name, _IdentityLayer(layer))
        return self

    def __exit__(self, *exc):
        for name, layer in self.originals.items():
            setattr(self.module, name, layer)
        return False


def sample_rows(size: int, sample: int | float | None, seed: int) -> torch.Tensor | None:
    """Row indices of a seeded sample (a count, or a fraction in (0, 1]), or None for all."""
    if sample is None:
        return None
    count = round(sample * size) if isinstance(sample, float) else int(sample)
    if not 1 <= count <= size:
        raise GraphgrowError(f"sensitivity sample {sample} does not fit {size} training samples",
                             hint="a count between 1 and the training size, or a fraction in (0, 1]")
    if count == size:
        return None
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].sort().values


# -- sensitivities (4.16, 4.17) and the threshold reference (4.18) ------------------------------

@dataclass
class Candidate:
    """One candidate layer (``position`` is its id in passes.extend_all's record, e.g.
    ``layer:act1``; ``after`` the node it follows): its merit (squared norm of the gradient of
    its merit weight under ``norm``) and costs."""
    position: str
    after: str
    kind: str
    node: str
    param: str
    shape: list[int]
    merit: float
    new_params: int
    flops: int
    norms: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return asdict(self)


@dataclass
class Sensitivities:
    """The candidates of a network, the merits of its existing weights (same norm) and the
    threshold reference: their mean (the denominator of 4.18)."""
    candidates: list[Candidate]
    existing: dict[str, float]
    norm: str
    samples: int
    extended_flops: int
    seconds: float = 0.0
    extended: object = None  # the fully-extended Network and its passes.Record, for the insertion
    record: object = None

    @property
    def reference(self) -> float:
        return sum(self.existing.values()) / len(self.existing) if self.existing else 0.0

    def ratio(self, candidate: Candidate) -> float:
        """The left side of (4.18): merit over the mean merit of the existing weights."""
        return candidate.merit / self.reference if self.reference > 0 else math.inf

    def to_json(self) -> dict:
        return {"norm": self.norm, "samples": self.samples, "reference": self.reference,
                "extended_flops": self.extended_flops, "seconds": self.seconds,
                "candidates": [{**c.to_json(), "ratio": self.ratio(c)} for c in self.candidates],
                "existing": self.existing}


def existing_weights(graph) -> dict[str, Geometry]:
    """Parameter name -> geometry of every weight matrix or kernel of the network."""
    found = {}
    for node in graph.nodes:
        for role in node.param_shapes():
            geometry = weight_geometry(node, role)
            if geometry is not None:
                found[f"{node.name}.{role}"] = geometry
    return found


def sensitivities(network, data, *, norm: str = "fro", loss: str = "cross_entropy", batch: int | None = 256,
                  sample: int | float | None = None, seed: int = 0, all_norms: bool = False) -> Sensitivities:
    """Candidates of ``network`` with their merits, from one pass over the training data (or a
    seeded sample) through the fully-extended network; no parameter of ``network`` changes.
    ``norm`` is one of MERIT_NORMS; ``all_norms`` also reports every other norm."""
    import time
    from .train import as_splits, check_data_fits, loss_fn
    if norm not in MERIT_NORMS:
        raise GraphgrowError(f"unknown merit norm '{norm}'", hint=f"use one of {', '.join(MERIT_NORMS)}")
    import passes
    start = time.perf_counter()
    train_split, _ = as_splits(data)
    check_data_fits(network, train_split)
    extended, record = passes.extend_all(network, "layers")
    if not record.candidates:
        raise GraphgrowError(f"network '{network.graph.name}' has no position where a layer can be inserted",
                             file=network.graph.source,
                             hint="SensLI inserts after ReLU activations and around residual blocks")
    rows = sample_rows(len(train_split), sample, seed)
    x, y = (train_split.x, train_split.y) if rows is None else (train_split.x[rows], train_split.y[rows])
    ext_graph = extended.graph
    weights = existing_weights(ext_graph)
    base_names = list(existing_weights(network.graph))  # old parameters keep their names
    merit_params = {cid: next(iter(info.merit)) for cid, info in record.candidates.items()}
    # identity candidates (dense, conv) skip their forward and input-gradient products: at the
    # identity they pass values and gradients through unchanged (residual candidates run as built)
    with identity_shortcuts(extended.module, [info.nodes[0] for info in record.candidates.values()
                                              if info.kind in ("dense", "conv")]):
        grads = full_data_gradients(extended.module, x, y, loss_fn(loss), base_names + list(merit_params.values()),
                                    batch=batch)
    existing = {name: gradient_norm(grads[name], weights[name], norm) for name in base_names}
    norms_wanted = MERIT_NORMS if all_norms else (norm,)
    shapes = {k: tuple(v.shape) for k, v in extended.module.named_parameters()}
    candidates = []
    for cid, info in record.candidates.items():
        param = merit_params[cid]
        values = {k: gradient_norm(grads[param], weights[param], k) for k in norms_wanted}
        candidates.append(Candidate(cid, info.position, info.kind, info.nodes[0], param, list(grads[param].shape),
                                    values[norm], sum(math.prod(shapes[p]) for p in info.params),
                                    sum(ext_graph.node(n).flops() for n in info.nodes), values))
    return Sensitivities(candidates, existing, norm, int(x.shape[0]), ext_graph.flops(),
                         time.perf_counter() - start, extended, record)


# -- where: selection strategies and the threshold (4.18) ---------------------------------------

STRATEGIES = ("sensli", "random", "min", "none")


def select(report: Sensitivities, strategy: str = "sensli", *, tau: float | None = None, count: int = 1,
           generator: torch.Generator | None = None) -> list[Candidate]:
    """Candidates to insert. ``sensli``: largest merits; ``min``: smallest ("LIother");
    ``random``: uniformly at random (seeded); ``none``: nothing. With ``tau`` (>= 1) a
    candidate is kept only if merit >= tau x the mean merit of the existing weights (4.18);
    up to ``count`` candidates that pass are returned (several layers at once)."""
    if strategy not in STRATEGIES:
        raise GraphgrowError(f"unknown strategy '{strategy}'", hint=f"use one of {', '.join(STRATEGIES)}")
    if tau is not None and not tau >= 1:
        raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.18), got {tau}")
    if strategy == "none":
        return []
    pool = list(report.candidates)
    if strategy == "random":
        order = torch.randperm(len(pool), generator=generator).tolist()
        pool = [pool[k] for k in order]
    else:
        pool.sort(key=lambda c: c.merit, reverse=strategy == "sensli")
    if tau is not None:
        pool = [c for c in pool if report.ratio(c) >= tau]
    return pool[:count]


# -- when: the growth hook (Algorithm 6) ----------------------------------------------------------

class GrowthHook:
    """Trainer hook running Algorithm 6: at the scheduled epochs (``insert_at`` or every
    ``insert_every`` epochs, at most ``max_insertions`` layers in all) it computes the
    sensitivities, selects by ``strategy`` (and ``tau``), inserts and lets training go on with
    the optimizer state carried over. Keeps the FLOP ledger of the run."""

    def __init__(self, *, strategy: str = "sensli", insert_at: Iterable[int] | None = None,
                 insert_every: int | None = None, max_insertions: int = 1, tau: float | None = None,
                 per_step: int = 1, norm: str = "fro", sens_batch: int | None = 256,
                 sample: int | float | None = None, seed: int = 0, widen: int = 0):
        from .flops import CostLedger
        if strategy not in STRATEGIES:
            raise GraphgrowError(f"unknown strategy '{strategy}'", hint=f"use one of {', '.join(STRATEGIES)}")
        if insert_every is not None and insert_every < 1:
            raise GraphgrowError(f"insert_every must be at least 1, got {insert_every}")
        if tau is not None and not tau >= 1:
            raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.18), got {tau}")
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
                               batch=self.sens_batch, sample=self.sample, seed=self.seed + trainer.epoch)
        self.ledger.add_sensitivity(report.extended_flops, report.samples / len(trainer.train_split))
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
        import passes
        from .train import evaluate
        before = evaluate(trainer.network, trainer.train_split, trainer.config.loss)["loss"]
        params_before = graph.num_params()
        grown, kept = passes.keep_candidates(report.extended, report.record, [c.position for c in chosen])
        after = evaluate(grown, trainer.train_split, trainer.config.loss)["loss"]
        trainer.replace_network(grown, record=kept, reason="insertion", positions=event["positions"])
        self.inserted += len(chosen)
        record = trainer.log.log("insertion", inserted=True, loss_before=before, loss_after=after,
                                 params_before=params_before, params_after=grown.graph.num_params(),
                                 nodes=[c.node for c in chosen], **event)
        self.insertions.append(record)
        where = ", ".join(f"{c.kind} layer after {c.after} (merit {c.merit:.3g}, ratio {report.ratio(c):.3g})" for c in chosen)
        trainer.write_progress(f"epoch {trainer.epoch}: inserted {len(chosen)} layer(s) at {where}; "
                               f"train loss before {before:.4f}, after {after:.4f}; "
                               f"{params_before} -> {grown.graph.num_params()} parameters")


    def _widen(self, trainer) -> None:
        from .train import evaluate
        before = evaluate(trainer.network, trainer.train_split, trainer.config.loss)["loss"]
        params_before = trainer.network.graph.num_params()
        wider, chosen, reference = widen_best(trainer.network, trainer_data(trainer), count=self.widen, tau=self.tau,
                                              loss=trainer.config.loss, batch=self.sens_batch,
                                              seed=self.seed + trainer.epoch)
        event = {"epoch": trainer.epoch, "iteration": trainer.iteration, "reference": reference,
                 "neurons": [c.to_json() for c in chosen], "tau": self.tau}
        if not chosen:
            trainer.log.log("widening", inserted=False, **event)
            return
        after = evaluate(wider, trainer.train_split, trainer.config.loss)["loss"]
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


# -- the engine functions the CLI calls -----------------------------------------------------------

def load_data(source, seed: int = 0):
    """A data set from ``spiral``, ``mnist:PATH`` or ``npz:PATH`` (or a data set object,
    returned as is). MNIST without train-* files uses the 10k test set split 8,000/2,000."""
    import os
    from . import data as datasets
    if not isinstance(source, str):
        return source
    kind, _, path = source.partition(":")
    if kind == "spiral" and not path:
        return datasets.spiral(seed)
    if kind == "mnist" and path:
        has_train = any(os.path.exists(os.path.join(path, "train-images-idx3-ubyte" + s)) for s in ("", ".gz"))
        return datasets.mnist(path) if has_train else datasets.mnist(path, split=(8000, 2000), seed=seed)
    if kind == "npz" and path:
        return datasets.npz(path)
    raise GraphgrowError(f"unknown data source '{source}'", hint="use spiral, mnist:PATH or npz:PATH")


def load_network(spec, seed: int = 0, weights=None):
    """A Network from a spec path (weights beside it or given), a LayerGraph or a Network."""
    from .compiler import Network
    from .ir import LayerGraph
    if isinstance(spec, Network):
        return spec
    if isinstance(spec, LayerGraph):
        return Network.build(spec, seed=seed)
    from .io import load
    return load(spec, weights, seed=seed)


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
         momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd", loss: str = "cross_entropy",
         sens_batch: int | None = 256, sample: int | float | None = None, out=None, seed: int = 0,
         progress: bool = False, eval_every: int = 1, log_steps: bool = True, export: bool = True,
         widen: int = 0) -> GrowResult:
    """Train ``spec`` on ``data`` while SensLI (or a comparison strategy) inserts layers.

    ``spec``: spec path, LayerGraph or Network; ``data``: a data set or spiral / mnist:PATH /
    npz:PATH. With ``out`` a run directory gets log.jsonl, summary.json, final.yaml + .pt,
    model.pt2 and curves.png. ``widen=k`` adds the k best neurons per try (4.4, 4.20)
    instead of inserting layers (``max_insertions`` then counts widening steps). Returns the grown network, the records, the insertion events
    and the summary (final metrics, FLOPs per training sample as in thesis Tables 4.2/4.4)."""
    from .plots import plot_run
    from .runlog import RunLog
    from .train import TrainConfig, Trainer
    dataset = load_data(data, seed)
    network = load_network(spec, seed)
    config = TrainConfig(epochs=epochs, lr=lr, batch=batch, momentum=momentum, weight_decay=weight_decay,
                         optimizer=optimizer, loss=loss, seed=seed, progress=progress, eval_every=eval_every,
                         log_steps=log_steps)
    if insert_every is None and not insert_at and strategy != "none":
        insert_every = max(epochs // (max_insertions + 1), 1)
    hook = GrowthHook(strategy=strategy, insert_at=insert_at, insert_every=insert_every,
                      max_insertions=max_insertions, tau=tau, per_step=per_step, norm=norm,
                      sens_batch=sens_batch, sample=sample, seed=seed, widen=widen)
    start_params, start_flops = network.graph.num_params(), network.graph.flops()
    with RunLog(out) as log:
        trainer = Trainer(network, dataset, config, log=log, hooks=[hook])
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


# -- widening (4.4): neuron candidates with zero outgoing weights, criterion (4.20) --------------

def widening_positions(graph) -> list[str]:
    """Linear layers that can be widened without changing the function: ``L -> activation ->
    M`` with L's output read only by the activation and the activation's only by the linear M."""
    found = []
    for node in graph.nodes:
        if node.op != "linear" or node.name in graph.outputs:
            continue
        readers = graph.consumers(node.name)
        if len(readers) != 1 or not graph.node(readers[0]).opdef.elementwise or readers[0] in graph.outputs:
            continue
        after = graph.consumers(readers[0])
        if len(after) == 1 and graph.node(after[0]).op == "linear" and len(node.out_shape) == 1:
            found.append(node.name)
    return found


def _next_linear(graph, name: str) -> str:
    return graph.consumers(graph.consumers(name)[0])[0]


def widen_layers(network, new_rows: dict[str, torch.Tensor]):
    """The network with layer L widened by the rows ``new_rows[L]`` (k, fan_in) of incoming
    weights, zero biases and zero outgoing weights (4.19): the function is unchanged. Old
    parameters keep their names and sit in the leading rows/columns."""
    from .compiler import Network, compile_graph
    graph = network.graph.copy()
    for name, rows in new_rows.items():
        graph.node(name).args["out"] += rows.shape[0]
    graph.infer_shapes()
    module = compile_graph(graph, seed=0)
    state = {k: torch.zeros_like(v) for k, v in module.state_dict().items()}
    for key, old in network.state().items():
        state[key][tuple(slice(0, s) for s in old.shape)] = old
    for name, rows in new_rows.items():
        width = network.graph.node(name).out_shape[0]
        # columns past the old fan-in belong to neurons added upstream; their weights stay zero
        state[f"{name}.weight"][width:, :rows.shape[1]] = rows
    module.load_state_dict(state)
    return Network(graph, module)


@dataclass
class NeuronCandidate:
    layer: str
    index: int
    merit: float

    def to_json(self) -> dict:
        return asdict(self)


def neuron_sensitivities(network, data, *, per_layer: int = 8, loss: str = "cross_entropy",
                         batch: int | None = 256, seed: int = 0):
    """Widening candidates (4.19): ``per_layer`` new neurons per widenable layer with seeded
    incoming weights (normal, std 1/sqrt(fan_in)), zero bias and zero outgoing weights. Merit
    of a neuron: ||gradient of its outgoing weight column||^2; reference for (4.20): the mean of
    that quantity over the existing columns of the outgoing weight matrices. Returns
    (candidates, reference, rows) where rows[layer] are the candidate incoming weights."""
    from .train import as_splits, loss_fn
    layers = widening_positions(network.graph)
    if not layers:
        raise GraphgrowError(f"network '{network.graph.name}' has no layer that can be widened",
                             hint="widening needs linear -> activation -> linear")
    generator = torch.Generator().manual_seed(seed)
    rows = {}
    for name in layers:
        fan_in = network.graph.node(name).in_shapes[0][-1]
        rows[name] = torch.randn(per_layer, fan_in, generator=generator) / math.sqrt(fan_in)
    wide = widen_layers(network, rows)
    split, _ = as_splits(data)
    outgoing = {name: f"{_next_linear(network.graph, name)}.weight" for name in layers}
    grads = full_data_gradients(wide.module, split.x, split.y, loss_fn(loss), list(outgoing.values()), batch=batch)
    candidates, existing = [], []
    for name in layers:
        width = network.graph.node(name).out_shape[0]
        column_merits = grads[outgoing[name]].double().pow(2).sum(dim=0)
        existing.extend(column_merits[:width].tolist())
        candidates += [NeuronCandidate(name, k, float(column_merits[width + k])) for k in range(per_layer)]
    return candidates, sum(existing) / len(existing), rows


def widen_best(network, data, *, count: int = 1, tau: float | None = None, per_layer: int = 8,
               loss: str = "cross_entropy", batch: int | None = 256, seed: int = 0):
    """Add the ``count`` best neuron candidates (those passing 4.20 when ``tau`` is given);
    returns (network, chosen candidates, reference)."""
    if tau is not None and not tau >= 1:
        raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.20), got {tau}")
    candidates, reference, rows = neuron_sensitivities(network, data, per_layer=per_layer, loss=loss,
                                                       batch=batch, seed=seed)
    ranked = sorted(candidates, key=lambda c: c.merit, reverse=True)
    if tau is not None:
        ranked = [c for c in ranked if c.merit >= tau * reference]
    chosen = ranked[:count]
    keep: dict[str, list[int]] = {}
    for candidate in chosen:
        keep.setdefault(candidate.layer, []).append(candidate.index)
    if not keep:
        return network, [], reference
    return widen_layers(network, {name: rows[name][sorted(idx)] for name, idx in keep.items()}), chosen, reference
