"""SensLI (thesis chapter 4) as a graph-level optimization: sensitivity-based layer insertion
and widening during training.

The engine plans the identity candidates at every legal position (the layers passes.extend_all
would insert), reads the loss gradient with respect to every candidate weight over the training
data without changing any parameter (4.16) from one forward and backward pass of the current
network (the candidates compute the identity, so their weight gradients are functions of the
activation and its loss gradient at their position), scores each candidate by a norm of that
gradient (4.17, B.1a-e), picks where to insert (argmax; or the comparisons random / smallest
merit / none), checks the threshold (4.18), inserts the chosen candidates (extend_all, then
keep_candidates) and lets training go on with the optimizer state carried over.

Public entry points for the CLI: ``grow`` and ``sensitivities``.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, NamedTuple, Sequence

import torch
from torch import fx
from torch.nn.grad import conv2d_input

from .errors import GraphgrowError
from .ops.base import Geometry

# -- norms of weight gradients (4.17, B.1a-e) -------------------------------------------------

#: merit norms: fro (4.17, B.1a), fro_width (4.17 scaled by 1/n^2, n the layer's output width),
#: fro_entries (B.1b, scaled by the number of entries), op (B.1c, squared operator norm of the
#: weight as a linear map on its actual input), op_out2 (B.1d), op_out1 (B.1e).
MERIT_NORMS = ("fro", "fro_width", "fro_entries", "op", "op_out2", "op_out1")


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
    if norm in ("fro", "fro_width", "fro_entries"):
        # one fused kernel in float64 (a noticeable part of an evaluation on spiral-sized networks)
        squared = float(torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)) ** 2
        return squared / {"fro": 1, "fro_width": grad.shape[0] ** 2, "fro_entries": grad.numel()}[norm]
    grad = grad.detach().to(torch.float64)
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

class Tap(NamedTuple):
    """What a gradient pass does at the output ``a`` of one node of a compiled network: it
    continues with ``through(a)`` (elementwise nodes that give back the values of ``a``, e.g.
    the trailing ReLU of an identity candidate after a ReLU; None: ``a`` itself) and calls
    ``take(a, grad)`` with the loss gradient at the input of ``through`` as soon as the
    backward pass has it."""
    take: Callable[[torch.Tensor, torch.Tensor], None]
    through: Callable[[torch.Tensor], torch.Tensor] | None = None


class _TappingInterpreter(fx.Interpreter):
    """Runs a compiled network node by node (no new compilation), applying the ``taps`` (by
    spec node name; "input" for the network input)."""

    def __init__(self, module: fx.GraphModule, taps: dict[str, Tap]):
        super().__init__(module)
        self.taps = taps
        value_nodes: dict[str, fx.Node] = {}
        for node in module.graph.nodes:
            name = "input" if node.op == "placeholder" else node.meta.get("graphgrow", {}).get("node")
            if name in taps:  # a spec node may emit several fx nodes (a multi-input add); its value is the last
                value_nodes[name] = node
        missing = set(taps) - set(value_nodes)
        if missing:
            raise KeyError(f"no nodes {sorted(missing)} in the compiled network")
        self.tapped = {node: name for name, node in value_nodes.items()}
        self.unreached: dict[str, torch.Tensor] = {}

    def run_tapped(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The network's output for ``x`` and the leaves the caller must differentiate with
        respect to (tapped values without autograd history, e.g. the input), so that the
        backward pass reaches every tap. Each tapped value ``a`` continues as
        ``through(view of a)``; a hook on the view hands its gradient to ``take`` during the
        backward pass, so it is used while fresh and then freed, as in a backward pass of the
        extended network. ``unreached`` keeps the tapped values whose hook has not run yet.
        (Interpreter.run without its progress bar and per-node bookkeeping, which cost about a
        quarter of a spiral network's forward pass.)"""
        self.env, self.args_iter, self.unreached, leaves = {}, iter((x,)), {}, []
        try:
            for node in self.graph.nodes:
                args, kwargs = self.fetch_args_kwargs_from_env(node)
                value = getattr(self, node.op)(node.target, args, kwargs)
                if node.op == "output":
                    return value, leaves
                name = self.tapped.get(node)
                if name is not None:
                    if not value.requires_grad:  # nothing upstream needs gradients: a leaf
                        value = value.detach().requires_grad_()
                        leaves.append(value)
                    self.unreached[name] = value.detach()
                    layer_output = value.view_as(value)  # the candidate layer's output, = a at the identity
                    layer_output.register_hook(self._hand_over(name))
                    through = self.taps[name].through
                    value = layer_output if through is None else through(layer_output)
                self.env[node] = value
            raise RuntimeError("the compiled network has no output node")
        finally:
            self.env = {}  # no reference from the interpreter to the autograd graph (its hooks refer to it)

    def _hand_over(self, name: str) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.taps[name].take(self.unreached.pop(name), grad)
        return hook


def full_data_gradients(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        names: Iterable[str], *, batch: int | None = None,
                        taps: dict[str, Tap] | None = None, progress: bool = False
                        ) -> tuple[dict[str, torch.Tensor], float]:
    """Gradient of the mean loss over all of (x, y) with respect to the named parameters,
    accumulated over batches weighted by batch size (so unequal batches give the exact
    full-data gradient), and that mean loss. No parameter, buffer or ``.grad`` changes: the
    module runs in eval mode (no batch-norm statistics updates, no dropout) and gradients come
    from ``torch.autograd.grad``.

    ``taps`` (for a compiled network): spec node name (or "input") -> Tap, whose ``take`` is
    called once per batch with the node's output and the loss gradient (of that batch's share of
    the mean loss) at the input of the tap's ``through``, during the same backward pass.
    ``progress``: a transient progress bar over the batches (when there are several)."""
    params = dict(module.named_parameters())
    names = list(names)
    missing = [n for n in names if n not in params]
    if missing:
        raise KeyError(f"no parameters {missing}")
    targets = [params[n] for n in names]
    runner = _TappingInterpreter(module, taps) if taps else None
    was_training = module.training
    # only the named parameters require gradients during the pass, so backward skips the
    # weight gradients of every other parameter (biases, normalisation, non-merit weights)
    flags = {name: p.requires_grad for name, p in params.items()}
    wanted = set(names)
    total = int(x.shape[0])
    step = total if batch is None else batch
    sums = [torch.zeros_like(p) for p in targets]
    mean_loss = 0.0
    module.eval()
    try:
        for name, p in params.items():
            p.requires_grad_(name in wanted)
        starts = range(0, total, step)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="sensitivities", unit="batch", leave=False, dynamic_ncols=True)
        for start in starts:
            xb, yb = x[start:start + step], y[start:start + step]
            output, leaves = (module(xb), []) if runner is None else runner.run_tapped(xb)
            value = loss(output, yb) * (xb.shape[0] / total)
            mean_loss = mean_loss + value.detach()  # a tensor: no device sync per batch
            if targets or leaves:
                grads = torch.autograd.grad(value, targets + leaves, allow_unused=True)
                for acc, grad in zip(sums, grads):
                    if grad is not None:
                        acc += grad
            for name, activation in (runner.unreached.items() if runner else ()):
                taps[name].take(activation, torch.zeros_like(activation))  # the loss does not depend on it
    finally:
        for name, p in params.items():
            p.requires_grad_(flags[name])
        module.train(was_training)
    return dict(zip(names, sums)), float(mean_loss)


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
    its merit weight under ``norm``), its new parameters and forward FLOPs per sample."""
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
    threshold reference: their mean (the denominator of 4.18). ``flops_per_sample``: what the
    evaluation computed per evaluated sample (graphgrow.flops.sensitivity_flops);
    ``extended_flops``: forward FLOPs of the fully-extended network, for comparison. ``loss``:
    the network's mean loss over the evaluated samples (a by-product of the pass), ``rows``
    their indices in the training split (None: all of it)."""
    candidates: list[Candidate]
    existing: dict[str, float]
    norm: str
    samples: int
    flops_per_sample: int
    extended_flops: int = 0
    seconds: float = 0.0
    loss: float = math.nan
    rows: torch.Tensor | None = field(default=None, repr=False)

    @property
    def reference(self) -> float:
        return sum(self.existing.values()) / len(self.existing) if self.existing else 0.0

    def ratio(self, candidate: Candidate) -> float:
        """The left side of (4.18): merit over the mean merit of the existing weights."""
        return candidate.merit / self.reference if self.reference > 0 else math.inf

    def to_json(self) -> dict:
        return {"norm": self.norm, "samples": self.samples, "loss": self.loss, "reference": self.reference,
                "flops_per_sample": self.flops_per_sample, "extended_flops": self.extended_flops,
                "seconds": self.seconds,
                "candidates": [{**c.to_json(), "ratio": self.ratio(c)} for c in self.candidates],
                "existing": self.existing}


def existing_weights(graph) -> dict[str, Geometry]:
    """Parameter name -> geometry of every weight matrix or kernel of the network."""
    found = {}
    for node in graph.nodes:
        for role in node.param_shapes():
            geometry = node.opdef.weight_geometry(node.args, node.in_shapes, role)
            if geometry is not None:
                found[f"{node.name}.{role}"] = geometry
    return found


def sensitivities(network, data, *, norm: str = "fro", loss: str = "cross_entropy", batch: int | None = 256,
                  sample: int | float | None = None, seed: int = 0, all_norms: bool = False,
                  progress: bool = False) -> Sensitivities:
    """Candidates of ``network`` with their merits, from one forward and backward pass of
    ``network`` itself over the training data (or a seeded sample); no parameter of ``network``
    changes and nothing is compiled. Each candidate is the identity layer extend_all would
    insert; its merit-weight gradient is computed from the activation at its position and the
    loss gradient there (passes IdentityPlan.merit_gradient), exactly the gradient in the
    fully-extended network. ``norm`` is one of MERIT_NORMS; ``all_norms`` also reports every
    other norm. ``progress``: a transient progress bar over the batches of the pass."""
    import time
    from passes.extend import plan_candidates
    from passes.record import network_dtype
    from .flops import sensitivity_flops
    from .train import as_splits, check_data_fits, loss_fn
    if norm not in MERIT_NORMS:
        raise GraphgrowError(f"unknown merit norm '{norm}'", hint=f"use one of {', '.join(MERIT_NORMS)}")
    start = time.perf_counter()
    train_split, _ = as_splits(data)
    check_data_fits(network, train_split)
    graph = network.graph
    plans = plan_candidates(graph)
    if not plans:
        raise GraphgrowError(f"network '{graph.name}' has no position where a layer can be inserted",
                             file=graph.source,
                             hint="SensLI inserts after ReLU activations and around residual blocks")
    rows = sample_rows(len(train_split), sample, seed)
    x, y = (train_split.x, train_split.y) if rows is None else (train_split.x[rows], train_split.y[rows])
    x = x.to(network_dtype(network))  # the data splits are float32; a float64 network computes in float64
    weights = existing_weights(graph)
    merit_grads: dict[str, torch.Tensor] = {}

    def accumulate(cid, plan):
        def take(activation, grad):
            merit_grad = plan.merit_gradient(activation, grad)
            merit_grads[cid] = merit_grads[cid] + merit_grad if cid in merit_grads else merit_grad
        return take

    # the pass runs each candidate's trailing activation (ReLU after a ReLU: same values) so that
    # the backward pass gives the gradient at the candidate layer's output, as in the extended network
    taps = {plan.after: Tap(accumulate(cid, plan), plan.trailing) for cid, plan in plans.items()}
    grads, mean_loss = full_data_gradients(network.module, x, y, loss_fn(loss), list(weights), batch=batch, taps=taps,
                                           progress=progress)
    existing = {name: gradient_norm(grads[name], weights[name], norm) for name in weights}
    norms_wanted = MERIT_NORMS if all_norms else (norm,)
    candidates, gradient_flops = [], []
    for cid, plan in plans.items():
        shape, head, grad = graph.shape_of(plan.after), plan.nodes[0], merit_grads[cid]
        geometry = head.opdef.weight_geometry(head.args, [shape], plan.merit_role)
        values = {k: gradient_norm(grad, geometry, k) for k in norms_wanted}
        candidates.append(Candidate(cid, plan.after, plan.kind, head.name, plan.merit_param, list(grad.shape),
                                    values[norm], sum(t.numel() for t in plan.values.values()),
                                    plan.forward_flops(shape), values))
        gradient_flops.append(plan.merit_gradient_flops(shape))
    forward = graph.flops()
    return Sensitivities(candidates, existing, norm, int(x.shape[0]), sensitivity_flops(forward, gradient_flops),
                         forward + sum(c.flops for c in candidates), time.perf_counter() - start, mean_loss, rows)


def insert_candidates(network, positions: Iterable[str]):
    """``network`` with the candidates ``positions`` (ids from ``sensitivities``) inserted with
    the initial values their merits were computed for (passes.extend_all, then keep_candidates;
    built at insertion time only). Returns (network, passes.Record) for Trainer.replace_network."""
    import passes
    return passes.keep_candidates(*passes.extend_all(network, "layers"), positions)


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
                               batch=self.sens_batch, sample=self.sample, seed=self.seed + trainer.epoch,
                               progress=trainer.config.progress)
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
        from .train import Split, evaluate
        # the loss before comes free with the sensitivity pass; the one after (equal up to
        # rounding: the insertion preserves the function) is taken on the same samples, so an
        # insertion costs one forward pass over them, not two over the whole training split
        before, params_before = report.loss, graph.num_params()
        grown, kept = insert_candidates(trainer.network, [c.position for c in chosen])
        split = trainer.train_split
        rows = split if report.rows is None else Split(split.x[report.rows], split.y[report.rows])
        after = evaluate(grown, rows, trainer.config.loss)["loss"]
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
         momentum: float = 0.0, weight_decay: float = 0.0, optimizer: str = "sgd", damping: float = 0.01,
         loss: str = "cross_entropy",
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
                         optimizer=optimizer, damping=damping, loss=loss, seed=seed, progress=progress,
                         eval_every=eval_every, log_steps=log_steps)
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
    grads, _ = full_data_gradients(wide.module, split.x, split.y, loss_fn(loss), list(outgoing.values()), batch=batch)
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
