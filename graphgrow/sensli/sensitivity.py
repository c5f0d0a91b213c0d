"""The sensitivity pass of SensLI: loss gradients with respect to the weights of identity
candidates at every legal position over the training data (thesis 4.16), their merits, and the
selection of where to insert (4.18)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, NamedTuple

import torch
from torch import fx

import passes
from passes.extend import plan_candidates

from ..errors import GraphgrowError
from ..ops.base import Geometry
from ..runtime.flops import sensitivity_flops
from ..runtime.splits import as_splits, check_data_fits, loss_fn
from .norms import MERIT_NORMS, gradient_norm

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
    spec node name; "input" for the network input; a list applies its taps in order, each to
    the previous one's continuation)."""

    def __init__(self, module: fx.GraphModule, taps: dict[str, Tap | list[Tap]]):
        super().__init__(module)
        self.taps = {name: [tap] if isinstance(tap, Tap) else list(tap) for name, tap in taps.items()}
        value_nodes: dict[str, fx.Node] = {}
        for node in module.graph.nodes:
            name = "input" if node.op == "placeholder" else node.meta.get("graphgrow", {}).get("node")
            if name in taps:  # a spec node may emit several fx nodes (a multi-input add); its value is the last
                value_nodes[name] = node
        missing = set(taps) - set(value_nodes)
        if missing:
            raise KeyError(f"no nodes {sorted(missing)} in the compiled network")
        self.tapped = {node: name for name, node in value_nodes.items()}
        self.unreached: dict[tuple[str, int], torch.Tensor] = {}

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
                    for k, tap in enumerate(self.taps[name]):
                        self.unreached[name, k] = value.detach()
                        layer_output = value.view_as(value)  # the candidate layer's output, = a at the identity
                        layer_output.register_hook(self._hand_over(name, k))
                        value = layer_output if tap.through is None else tap.through(layer_output)
                self.env[node] = value
            raise RuntimeError("the compiled network has no output node")
        finally:
            self.env = {}  # no reference from the interpreter to the autograd graph (its hooks refer to it)

    def _hand_over(self, name: str, k: int) -> Callable[[torch.Tensor], None]:
        def hook(grad: torch.Tensor) -> None:
            self.taps[name][k].take(self.unreached.pop((name, k)), grad)
        return hook


def full_data_gradients(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor,
                        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                        names: Iterable[str], *, batch: int | None = None,
                        taps: dict[str, Tap] | None = None, progress: bool = False,
                        total: int | None = None) -> tuple[dict[str, torch.Tensor], float]:
    """Gradient of the mean loss over all of (x, y) with respect to the named parameters,
    accumulated over batches weighted by batch size (so unequal batches give the exact
    full-data gradient), and that mean loss. ``total``: the number of samples the
    mean is over, when (x, y) are this process's part of a data-parallel pass (default: all of x). No parameter, buffer or ``.grad`` changes: the
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
    total = int(x.shape[0]) if total is None else total
    step = max(int(x.shape[0]), 1) if batch is None else batch
    sums = [torch.zeros_like(p) for p in targets]
    device = next(iter(params.values())).device if params else x.device
    mean_loss = torch.zeros((), dtype=torch.float64, device=device)
    module.eval()
    try:
        for name, p in params.items():
            p.requires_grad_(name in wanted)
        starts = range(0, int(x.shape[0]), step)
        if progress and len(starts) > 1:
            from tqdm.auto import tqdm
            starts = tqdm(starts, desc="sensitivities", unit="batch", leave=False, dynamic_ncols=True)
        for start in starts:
            xb, yb = x[start:start + step].to(device), y[start:start + step].to(device)
            output, leaves = (module(xb), []) if runner is None else runner.run_tapped(xb)
            value = loss(output, yb) * (xb.shape[0] / total)
            mean_loss = mean_loss + value.detach()  # a tensor: no device sync per batch
            if targets or leaves:
                grads = torch.autograd.grad(value, targets + leaves, allow_unused=True)
                for acc, grad in zip(sums, grads):
                    if grad is not None:
                        acc += grad
            for (name, k), activation in (runner.unreached.items() if runner else ()):
                runner.taps[name][k].take(activation, torch.zeros_like(activation))  # the loss does not depend on it
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
        raise GraphgrowError(f"sensitivity sample {sample} does not fit {size} training samples", option="sample",
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


#: which candidates the sensitivity pass scores
CANDIDATE_KINDS = ("all", "layers", "blocks")


def sensitivities(network, data, *, norm: str = "fro", loss: str = "cross_entropy", batch: int | None = 256,
                  sample: int | float | None = None, seed: int = 0, all_norms: bool = False,
                  progress: bool = False, data_parallel=None, candidates: str = "all") -> Sensitivities:
    """Candidates of ``network`` with their merits, from one forward and backward pass of
    ``network`` itself over the training data (or a seeded sample); no parameter of ``network``
    changes. Each layer candidate is the identity layer extend_all would insert; its merit-weight
    gradient is computed from the activation at its position and the loss gradient there
    (passes IdentityPlan.merit_gradient), exactly the gradient in the fully-extended network.
    Each block candidate (passes.block_candidates: a copy of a residual block with its last
    layer zero at a block boundary) is scored by the gradient of that zero layer, from its
    branch run on the activation at its position (the only thing compiled) and the loss gradient
    there (passes BlockPlan.merit_gradient), exactly its gradient with the copy inserted.
    ``candidates``: ``all``, ``layers`` (identity layers only) or ``blocks`` (block copies only). ``norm`` is one of MERIT_NORMS; ``all_norms`` also reports every
    other norm. ``progress``: a transient progress bar over the batches of the pass.
    ``data_parallel`` (runtime.distributed.DataParallel): each process takes its part of the
    samples and the sums (gradients, merit gradients, loss) of all parts are added up before any
    norm is taken, so every process gets the single-process report."""
    import time
    if norm not in MERIT_NORMS:
        raise GraphgrowError(f"unknown merit norm '{norm}'", option="norm", hint=f"use one of {', '.join(MERIT_NORMS)}")
    start = time.perf_counter()
    train_split, _ = as_splits(data, network.dtype)
    check_data_fits(network, train_split, loss)
    graph = network.graph
    if candidates not in CANDIDATE_KINDS:
        raise GraphgrowError(f"unknown candidate kind '{candidates}'", option="candidates",
                             hint=f"use one of {', '.join(CANDIDATE_KINDS)}")
    plans = plan_candidates(graph) if candidates != "blocks" else {}
    blocks = passes.block_candidates(network) if candidates != "layers" else {}
    if not plans and not blocks:
        raise GraphgrowError(f"network '{graph.name}' has no position where a layer can be inserted",
                             file=graph.source,
                             hint="SensLI inserts after ReLU activations, around residual nodes and at the "
                                  "boundaries of residual blocks")
    rows = sample_rows(len(train_split), sample, seed)
    x, y = (train_split.x, train_split.y) if rows is None else (train_split.x[rows], train_split.y[rows])
    samples = int(x.shape[0])
    if data_parallel is not None:
        part = data_parallel.part(samples)
        x, y = x[part], y[part]
    weights = existing_weights(graph)
    merit_grads: dict[str, torch.Tensor] = {}

    def accumulate(cid, merit_gradient):
        def take(activation, grad):
            merit_grad = merit_gradient(activation, grad)
            merit_grads[cid] = merit_grads[cid] + merit_grad if cid in merit_grads else merit_grad
        return take

    # the pass runs each candidate's trailing activation (ReLU after a ReLU: same values) so that
    # the backward pass gives the gradient at the candidate layer's output, as in the extended network
    taps: dict[str, list[Tap]] = {}
    for cid, plan in plans.items():
        taps.setdefault(plan.after, []).append(Tap(accumulate(cid, plan.merit_gradient), plan.trailing))
    for cid, plan in blocks.items():
        branch = plan.branch_network(network.dtype, network.device)
        merit = lambda a, g, plan=plan, branch=branch: plan.merit_gradient(branch, a, g)
        taps.setdefault(plan.after, []).append(Tap(accumulate(cid, merit), plan.trailing if plan.trailing_ops else None))
    # at one node, the taps with a trailing activation go first: the others then see the gradient
    # at its output, which is the gradient at the node itself (the node's values are its fixed points)
    taps = {name: sorted(group, key=lambda tap: tap.through is None) for name, group in taps.items()}
    grads, mean_loss = full_data_gradients(network.module, x, y, loss_fn(loss), list(weights), batch=batch, taps=taps,
                                           progress=progress, total=samples)
    if data_parallel is not None:
        for cid, plan in {**plans, **blocks}.items():  # a process with no samples has no merit gradients
            if cid not in merit_grads:
                merit = plan.values[plan.merit_param]
                merit_grads[cid] = torch.zeros(merit.shape, dtype=network.dtype, device=network.device)
        names, cids = list(grads), list(merit_grads)
        summed = data_parallel.sum([grads[n] for n in names] + [merit_grads[c] for c in cids]
                                   + [torch.tensor(mean_loss, dtype=torch.float64)])
        grads = dict(zip(names, summed[:len(names)]))
        merit_grads = dict(zip(cids, summed[len(names):-1]))
        mean_loss = float(summed[-1])
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
    for cid, plan in blocks.items():
        grad, (name, roles) = merit_grads[cid], plan.zeroed
        node = plan.graph.node(name)
        geometry = node.opdef.weight_geometry(node.args, node.in_shapes, roles[0])
        # a zeroed batch norm (a ResNet block's last layer) has no operator norms: its Frobenius ones only
        values = {k: gradient_norm(grad, geometry, k) for k in norms_wanted if geometry or k == norm or k.startswith("fro")}
        candidates.append(Candidate(cid, plan.after, "block", name, plan.merit_param, list(grad.shape), values[norm],
                                    sum(plan.graph.node(n.name).num_params() for n in plan.nodes),
                                    plan.forward_flops(), values))
        gradient_flops.append(plan.merit_gradient_flops())
    forward = graph.flops()
    return Sensitivities(candidates, existing, norm, samples, sensitivity_flops(forward, gradient_flops),
                         forward + sum(c.flops for c in candidates), time.perf_counter() - start, mean_loss, rows)


def insert_candidates(network, positions: Iterable[str]):
    """``network`` with the candidates ``positions`` (ids from ``sensitivities``) inserted with
    the initial values their merits were computed for (passes.extend_all, then keep_candidates;
    then passes.insert_block for block candidates; built at insertion time only). Returns
    (network, passes.Record) for Trainer.replace_network."""
    positions = list(positions)
    boundaries = [p[len("block:"):] for p in positions if p.startswith("block:")]
    layers = [p for p in positions if not p.startswith("block:")]
    grown, record = (passes.keep_candidates(*passes.extend_all(network, "layers"), layers)
                     if layers or not boundaries else (network, None))
    for after in boundaries:  # the copy the candidate was scored as
        grown, step = passes.insert_block(grown, passes.block_at(network.graph, after).output, after)
        record = step if record is None else record.then(step)
    return grown, record


# -- where: selection strategies and the threshold (4.18) ---------------------------------------

STRATEGIES = ("sensli", "random", "min", "none")


def select(report: Sensitivities, strategy: str = "sensli", *, tau: float | None = None, count: int = 1,
           generator: torch.Generator | None = None) -> list[Candidate]:
    """Candidates to insert. ``sensli``: largest merits; ``min``: smallest ("LIother");
    ``random``: uniformly at random (seeded); ``none``: nothing. With ``tau`` (>= 1) a
    candidate is kept only if merit >= tau x the mean merit of the existing weights (4.18);
    up to ``count`` candidates that pass are returned (several layers at once)."""
    if strategy not in STRATEGIES:
        raise GraphgrowError(f"unknown strategy '{strategy}'", option="strategy", hint=f"use one of {', '.join(STRATEGIES)}")
    if tau is not None and not tau >= 1:
        raise GraphgrowError(f"threshold tau must be >= 1 (thesis 4.18), got {tau}", option="tau")
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

