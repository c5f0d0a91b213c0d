"""Frobenius-type preconditioner against independent dense float64 computations of (5.15)."""
import copy
import io
import warnings

import pytest
import torch
import torch.fx
from torch import nn

from graphgrow.errors import GraphgrowError
from graphgrow.precond.factors import _spd_inverses
from graphgrow.runtime.data import mnist
from test_data import MNIST_DIR
from graphgrow.precond.frobenius import FrobeniusPreconditioner

LR = 0.5


class Residual(nn.Module):
    """The compiler's residual block: x + h * outer(act(inner(x)))."""

    def __init__(self, width):
        super().__init__()
        self.inner = nn.Linear(width, width)
        self.outer = nn.Linear(width, width, bias=False)
        self.h = 0.5

    def forward(self, x):
        return x + self.h * self.outer(torch.tanh(self.inner(x)))


class ResidualNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(5, 6)
        self.block = Residual(6)
        self.last = nn.Linear(6, 3)

    def forward(self, x):
        return self.last(torch.relu(self.block(self.first(x))))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 6), nn.Sigmoid(), nn.Linear(6, 3)).double()


def layer_samples(model, x, per_sample_loss):
    """Per-layer inputs and per-sample pre-activation gradients, by autograd on a summed loss."""
    captured = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            def hook(module, inputs, output, name=name):
                output.retain_grad()
                captured[name] = (inputs[0].detach(), output)
            handles.append(module.register_forward_hook(hook))
    per_sample_loss(model(x)).backward()
    for handle in handles:
        handle.remove()
    model.zero_grad()
    return {name: (inputs, output.grad.detach()) for name, (inputs, output) in captured.items()}


def dense_direction(inputs, grads, grad_w, grad_b, moment, damping_out, damping_in):
    """(C_y + γ1 I)⁻¹ ∇W (C_x + γ2 I)⁻¹ and (C_y + γ1 I)⁻¹ ∇b by explicit dense solves."""
    def estimate(samples):
        if moment == "covariance":
            samples = samples - samples.mean(0)
        return samples.T @ samples / samples.shape[0]
    c_out = estimate(grads) + damping_out * torch.eye(grads.shape[1], dtype=torch.float64)
    c_in = estimate(inputs) + damping_in * torch.eye(inputs.shape[1], dtype=torch.float64)
    weight = torch.linalg.solve(c_out, grad_w) @ torch.linalg.inv(c_in)
    bias = None if grad_b is None else torch.linalg.solve(c_out, grad_b)
    return weight, bias, c_out, c_in


def step_directions(model, optimizer, x, y, loss_fn, seed=1):
    """Run one step; return {layer: (weight direction, bias direction, ∇W, ∇b)} = (θ_old − θ_new)/lr."""
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    loss = loss_fn(model(x), y)
    torch.manual_seed(seed)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    result = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            prefix = f"{name}." if name else ""
            weight = (before[prefix + "weight"] - module.weight.detach()) / LR
            bias = None if module.bias is None else (before[prefix + "bias"] - module.bias.detach()) / LR
            result[name] = (weight, bias, grads[prefix + "weight"], grads.get(prefix + "bias"))
    return result


def sampled_labels(logits, seed, mc_samples):
    torch.manual_seed(seed)
    return [torch.distributions.Categorical(logits=logits.detach()).sample() for _ in range(mc_samples)]


@pytest.mark.parametrize("moment", ["second", "covariance"])
@pytest.mark.parametrize("labels", ["true", "sampled"])
@pytest.mark.parametrize("woodbury", [False, True])
def test_update_matches_dense_formula(moment, labels, woodbury):
    model = mlp()
    batch = 4 if woodbury else 12  # fewer samples than widths exercises the low-rank path
    torch.manual_seed(3)
    x, y = torch.randn(batch, 5, dtype=torch.float64), torch.randint(0, 3, (batch,))
    mc_samples = 2
    loss_fn = nn.CrossEntropyLoss()
    if labels == "true":
        reference = layer_samples(copy.deepcopy(model), x, lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))
    else:
        drawn = sampled_labels(model(x), seed=1, mc_samples=mc_samples)
        runs = [layer_samples(copy.deepcopy(model), x,
                              lambda out, d=d: nn.functional.cross_entropy(out, d, reduction="sum")) for d in drawn]
        reference = {name: (runs[0][name][0], torch.cat([run[name][1] for run in runs])) for name in runs[0]}
    optimizer = FrobeniusPreconditioner(model, lr=LR, moment=moment, labels=labels, loss=loss_fn,
                                        mc_samples=mc_samples, woodbury="auto" if woodbury else False,
                                        damping_out=0.03, damping_in=0.02)
    directions = step_directions(model, optimizer, x, y, loss_fn)
    for name, (weight, bias, grad_w, grad_b) in directions.items():
        inputs, grads = reference[name]
        expected_w, expected_b, _, _ = dense_direction(inputs, grads, grad_w, grad_b, moment, 0.03, 0.02)
        torch.testing.assert_close(weight, expected_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(bias, expected_b, rtol=1e-10, atol=1e-12)
    low_rank = "in_basis" in optimizer.state[model[0].weight]
    assert low_rank == woodbury
    # the fast path wherever a side is low rank; with two dense factors the general path is cheaper
    assert all(path == "push-through" if woodbury else path.startswith("general (both factors are dense")
               for path in optimizer.paths.values())


def random_spd(size, condition, seed):
    """Q diag(eigenvalues) Qᵀ with eigenvalues spread log-uniformly over [1/condition, 1]."""
    generator = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(size, size, dtype=torch.float64, generator=generator))
    eigenvalues = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), size, dtype=torch.float64)
    return basis @ torch.diag(eigenvalues) @ basis.T


@pytest.mark.parametrize("size", [1, 65, 100, 199])
def test_spd_inverses_match_an_lu_inverse(size):
    """The batched Cholesky inverses against LU inversion."""
    matrices = torch.stack([random_spd(size, condition, seed) for seed, condition in enumerate([1e1, 1e4, 1e8])])
    inverses, failed = _spd_inverses(matrices)
    assert not failed.any()
    for matrix, inverse in zip(matrices, inverses):
        expected = torch.linalg.inv(matrix)
        condition = torch.linalg.cond(matrix)
        torch.testing.assert_close(inverse, expected, rtol=0, atol=1e-13 * condition * expected.abs().max())


def test_spd_inverses_flag_exactly_the_matrices_that_are_not_positive_definite():
    """Indefinite in the leading block, only in the trailing Schur complement, singular: all
    flagged; the positive definite matrices of the same batch are still inverted correctly."""
    size, half = 100, 50
    positive = random_spd(size, 1e3, seed=0)
    leading = positive.clone()
    leading[3, 3] = -1.0
    trailing = positive.clone()
    trailing[half:, half:] -= 2.0 * torch.eye(size - half, dtype=torch.float64)  # A11 unchanged, S indefinite
    assert torch.linalg.eigvalsh(positive[:half, :half]).min() > 0
    singular = random_spd(size, 1e3, seed=1)
    singular -= torch.linalg.eigvalsh(singular).min() * torch.eye(size, dtype=torch.float64)
    inverses, failed = _spd_inverses(torch.stack([positive, leading, trailing, singular, positive]))
    assert failed.tolist() == [False, True, True, True, False]
    for position in (0, 4):
        torch.testing.assert_close(inverses[position], torch.linalg.inv(positive), rtol=1e-9, atol=1e-9)


@pytest.fixture(scope="module")
def mnist_batch():
    """The first 100 images of the MNIST test set split used by the benchmarks (784 inputs)."""
    data = mnist(MNIST_DIR, split=(8000, 2000), seed=0)
    return data.x_train[:100].flatten(1), data.y_train[:100]


def first_layer_direction(model, x, y, dtype, **options):
    """The first layer's update direction of one step of a copy of ``model`` in ``dtype``."""
    model = copy.deepcopy(model).to(dtype)
    optimizer = FrobeniusPreconditioner(model, lr=1.0, **options)
    before = model[0].weight.detach().clone()
    nn.functional.cross_entropy(model(x.to(dtype)), y).backward()
    optimizer.step()
    return (before - model[0].weight.detach()).double()


@pytest.mark.parametrize("damping, tolerance", [(1e-2, 1e-4), (1e-3, 1e-3)])
@pytest.mark.parametrize("options", [
    dict(woodbury=False),                                   # dense Cholesky factors
    dict(),                                                 # push-through fast path
    dict(labels="sampled", moment="covariance"),            # fast path, Woodbury on the output side
    dict(fast_path=False),                                  # general path, Woodbury on both sides
    dict(grad="direction"),                                 # the direction formed in the backward pass
], ids=["dense", "push-through", "push-through-sampled-centred", "woodbury", "direction"])
def test_float32_direction_on_mnist_first_layer_matches_float64(mnist_batch, damping, tolerance, options):
    """float32 against the float64 formula on the MNIST first layer (784 inputs, batch 100, so
    the damped input estimate has condition number about 36/γ). A block inverse through the Schur
    complement was off by 6e-2 here at γ = 1e-3 and stopped the autoencoder's plateau escape; the
    Woodbury difference in float32 was off by 3e-3."""
    x, y = mnist_batch
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))
    options = dict(damping_in=damping, damping_out=damping, loss=nn.CrossEntropyLoss(), **options)
    torch.manual_seed(1)  # the same Monte-Carlo labels in both precisions
    expected = first_layer_direction(model, x, y, torch.float64, **options)
    torch.manual_seed(1)
    direction = first_layer_direction(model, x, y, torch.float32, **options)
    assert float((direction - expected).norm() / expected.norm()) <= tolerance


@pytest.mark.parametrize("moment", ["second", "covariance"])
@pytest.mark.parametrize("woodbury", [False, True])
def test_direction_mode_leaves_the_dense_formula_in_grad(moment, woodbury, caplog):
    """grad='direction': after backward() .grad holds (C_y + γ1 I)⁻¹ ∇W (C_x + γ2 I)⁻¹ and
    (C_y + γ1 I)⁻¹ ∇b, against dense float64 solves with ∇W = Σ_j r_j x_jᵀ / B from per-sample
    gradients; step() then moves by lr times it. The mode is logged."""
    model = mlp()
    batch = 4 if woodbury else 12
    torch.manual_seed(3)
    x, y = torch.randn(batch, 5, dtype=torch.float64), torch.randint(0, 3, (batch,))
    reference = layer_samples(copy.deepcopy(model), x, lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))
    with caplog.at_level("INFO", logger="graphgrow.precond.frobenius"):
        optimizer = FrobeniusPreconditioner(model, lr=LR, moment=moment, grad="direction",
                                            damping_out=0.03, damping_in=0.02)
    assert any("grad='direction'" in record.getMessage() for record in caplog.records)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    nn.functional.cross_entropy(model(x), y).backward()
    for name, module in model.named_children():
        if not isinstance(module, nn.Linear):
            continue
        inputs, grads = reference[name]
        grad_w, grad_b = grads.T @ inputs / batch, grads.sum(0) / batch
        expected_w, expected_b, _, _ = dense_direction(inputs, grads, grad_w, grad_b, moment, 0.03, 0.02)
        torch.testing.assert_close(module.weight.grad, expected_w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(module.bias.grad, expected_b, rtol=1e-10, atol=1e-12)
        assert optimizer.paths[name] == "direction (formed in the backward pass)"
    directions = {name: p.grad.clone() for name, p in model.named_parameters()}
    optimizer.step()
    for name, parameter in model.named_parameters():
        torch.testing.assert_close(parameter.detach(), before[name] - LR * directions[name], rtol=0, atol=1e-15)


@pytest.mark.parametrize("options", [dict(estimate="batch", update_interval=3), dict(estimate="ema", update_interval=2),
                                     dict(estimate="ema_inverse", update_interval=2, moment="covariance")])
def test_between_refreshes_the_kept_operators_act_on_the_factors(options):
    """Refreshed every K steps: between refreshes the fast path and grad='direction' apply the kept
    operators to the factors, (P_out Rᵀ)(X P_in); the general path (fast_path=False) applies them to
    .grad = Rᵀ X. Six steps of each agree; the fast path is taken (and logged in ``paths``) on the
    layers with fewer samples than inputs and outputs, and a clipped gradient takes the general path."""
    torch.manual_seed(5)
    data = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(6)]
    models, paths = [], []
    for settings in (dict(fast_path=False), dict(), dict(grad="direction")):
        model = mlp()
        optimizer = FrobeniusPreconditioner(model, lr=0.1, momentum=0.5, **settings, **options)
        for x, y in data:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        models.append(model)
        paths.append(optimizer.paths)
    for general, *others in zip(*(model.parameters() for model in models)):
        for other in others:
            torch.testing.assert_close(other, general, rtol=1e-9, atol=1e-12)
    assert paths[1]["0 (between refreshes)"] == paths[1]["2 (between refreshes)"] == "factors"
    assert paths[1]["4 (between refreshes)"].startswith("general (at least as many samples")
    assert paths[0]["0 (between refreshes)"] == "general (fast_path=False)"
    model = mlp()
    optimizer = FrobeniusPreconditioner(model, lr=0.1, **options)
    for clip in (False, True):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data[0][0]), data[0][1]).backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
        optimizer.step()
    assert optimizer.paths["0 (between refreshes)"].startswith("general (.grad was changed")


def test_between_refreshes_with_monte_carlo_labels_matches_the_general_path():
    """Monte-Carlo labels are drawn on refresh steps only, also when the hooks keep the factors
    between refreshes for the fast path: the same draws and the same steps as fast_path=False."""
    torch.manual_seed(5)
    data = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(6)]
    results = []
    for fast_path in (False, True):
        model = mlp()
        optimizer = FrobeniusPreconditioner(model, lr=0.1, fast_path=fast_path, labels="sampled", estimate="ema",
                                            update_interval=2, loss=nn.CrossEntropyLoss())
        torch.manual_seed(0)
        for x, y in data:
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
        results.append((model, optimizer.paths))
    (general, _), (fast, paths) = results
    assert paths["0 (between refreshes)"] == "factors"
    for a, b in zip(fast.parameters(), general.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_direction_mode_clips_and_accumulates_directions_and_detaches():
    """What grad='direction' means for the user: clipping acts on the direction, two backward
    passes add their two directions (each with its own batch's statistics), remove_hooks() and a
    deepcopy of the model give the plain forward again."""
    torch.manual_seed(4)
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    model = mlp()
    optimizer = FrobeniusPreconditioner(model, lr=LR, grad="direction")
    halves = []
    for part in (slice(0, 3), slice(3, 8)):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
        halves.append([p.grad.clone() for p in model.parameters()])
    optimizer.zero_grad()
    for part in (slice(0, 3), slice(3, 8)):
        nn.functional.cross_entropy(model(x[part]), y[part]).backward()
    for parameter, first, second in zip(model.parameters(), *halves):
        torch.testing.assert_close(parameter.grad, first + second, rtol=1e-12, atol=1e-14)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
    assert norm > 1e-3
    clipped = [p.grad.clone() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    optimizer.step()
    for parameter, old, direction in zip(model.parameters(), before, clipped):
        torch.testing.assert_close(parameter.detach(), old - LR * direction, rtol=0, atol=1e-15)
    copied = copy.deepcopy(model)
    copied.zero_grad()
    nn.functional.cross_entropy(copied(x), y).backward()  # the copy computes plain gradients
    plain = mlp()
    plain.load_state_dict(copied.state_dict())
    nn.functional.cross_entropy(plain(x), y).backward()
    for a, b in zip(copied.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    unpickled = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(unpickled(x), plain(x), rtol=1e-12, atol=1e-14)
    unpickled.zero_grad()
    nn.functional.cross_entropy(unpickled(x), y).backward()  # plain gradients, no optimizer behind it
    for a, b in zip(unpickled.parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-12, atol=1e-14)
    optimizer.remove_hooks()
    assert all("forward" not in module.__dict__ for module in model.modules())


@pytest.mark.parametrize("options", [dict(labels="sampled", loss=nn.CrossEntropyLoss()), dict(backend="backpack"),
                                     dict(track_diagnostics=True), dict(grad="hessian")])
def test_direction_mode_refuses_what_it_cannot_do(options):
    options = {"grad": "direction", **options}
    with pytest.raises(GraphgrowError):
        FrobeniusPreconditioner(mlp(), **options)
    convolution = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(GraphgrowError, match="nn.Linear layers only"):
        FrobeniusPreconditioner(convolution, grad="direction")


def fast_and_general_steps(modify, loss_term=None, set_to_none=True):
    """One step of the same model with the fast path allowed and with fast_path=False, with
    ``modify(model)`` applied to the gradients between backward and step (and ``loss_term(model)``
    added to the loss); returns both updated models and the first optimizer's paths."""
    torch.manual_seed(6)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    results = []
    for fast_path in (True, False):
        model = mlp()
        optimizer = FrobeniusPreconditioner(model, lr=LR, fast_path=fast_path, damping_out=0.03, damping_in=0.02)
        for parameter in model.parameters():  # as after an earlier step
            parameter.grad = torch.ones_like(parameter)
        optimizer.zero_grad(set_to_none=set_to_none)
        loss = nn.functional.cross_entropy(model(x), y)
        if loss_term is not None:
            loss = loss + loss_term(model)
        loss.backward()
        modify(model)
        optimizer.step()
        results.append((model, optimizer.paths))
    return results


@pytest.mark.parametrize("case", ["clip_grad_norm", "grad replaced", "penalty in the loss", "zero_grad to zeros"])
def test_modified_gradient_falls_back_to_the_general_path_exactly(case):
    """A .grad that is not autograd's Σ Rᵀ X of the recorded passes takes the general path, with
    its result (the fast path would silently drop the modification)."""
    modify, loss_term, set_to_none = (lambda model: None), None, True
    if case == "clip_grad_norm":
        modify = lambda model: torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)  # noqa: E731
    elif case == "grad replaced":
        def modify(model):
            model[0].weight.grad = model[0].weight.grad + 1e-3 * model[0].weight.detach()
    elif case == "penalty in the loss":
        loss_term = lambda model: 1e-4 * model[2].weight.pow(2).sum()  # noqa: E731
    else:
        set_to_none = False
    (fast, paths), (general, _) = fast_and_general_steps(modify, loss_term, set_to_none)
    layer = {"clip_grad_norm": "0", "grad replaced": "0", "penalty in the loss": "2", "zero_grad to zeros": "0"}[case]
    assert paths[layer].startswith("general"), paths
    for name, parameter in fast.named_parameters():
        expected = dict(general.named_parameters())[name]
        if paths[name.split(".")[0]].startswith("general"):  # the same computation: bit for bit
            assert torch.equal(parameter, expected), name
        else:
            torch.testing.assert_close(parameter, expected, rtol=1e-9, atol=1e-12)
    if case == "grad replaced":
        assert paths["2"] == "push-through"


def test_fast_path_is_logged_once_per_change(caplog):
    torch.manual_seed(6)
    model = mlp()
    optimizer = FrobeniusPreconditioner(model, lr=LR)
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    with caplog.at_level("INFO", logger="graphgrow.precond.frobenius"):
        for clip in (False, False, True):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            if clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e-3)
            optimizer.step()
    messages = [record.getMessage() for record in caplog.records if "layer '0'" in record.getMessage()]
    assert len(messages) == 2 and "push-through" in messages[0] and "clipping" in messages[1]


@pytest.mark.parametrize("woodbury", [False, True])
def test_gradient_accumulated_over_unequal_batches_uses_all_samples(woodbury):
    """Two forward/backward passes (batches of 3 and 5) before one step: the statistics are those
    of all 8 per-sample gradients, each batch's mean-loss gradients rescaled by its own size."""
    model = mlp()
    torch.manual_seed(4)
    batches = [(torch.randn(n, 5, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (3, 5)]
    references = [layer_samples(copy.deepcopy(model), x, lambda out, y=y: nn.functional.cross_entropy(
        out, y, reduction="sum")) for x, y in batches]
    optimizer = FrobeniusPreconditioner(model, lr=LR, woodbury=woodbury, damping_out=0.03, damping_in=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    for x, y in batches:
        nn.functional.cross_entropy(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name in ("0", "2", "4"):
        inputs = torch.cat([reference[name][0] for reference in references])
        per_sample = torch.cat([reference[name][1] for reference in references])
        expected_w, expected_b, _, _ = dense_direction(inputs, per_sample, grads[f"{name}.weight"],
                                                       grads[f"{name}.bias"], "second", 0.03, 0.02)
        layer = model[int(name)]
        torch.testing.assert_close((before[f"{name}.weight"] - layer.weight.detach()) / LR, expected_w,
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close((before[f"{name}.bias"] - layer.bias.detach()) / LR, expected_b,
                                   rtol=1e-10, atol=1e-12)
    assert ("in_basis" in optimizer.state[model[0].weight]) == woodbury
    if woodbury:  # the push-through output side with S = cat(f_c R_c): F⁻¹ applied
        assert set(optimizer.paths.values()) == {"push-through"}


def test_preconditioned_gradient_is_riesz_representative():
    """<∂f, δW> = (G, δW)_{X→Y} = trace(R_X⁻¹ Gᵀ R_Y δW) with R_X = (C_x+γ2)⁻¹, R_Y = C_y+γ1."""
    model = mlp()
    torch.manual_seed(4)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    reference = layer_samples(copy.deepcopy(model), x, lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))
    optimizer = FrobeniusPreconditioner(model, lr=LR, moment="covariance", damping_out=0.05, damping_in=0.01)
    for name, (direction, _, grad_w, _) in step_directions(model, optimizer, x, y, nn.CrossEntropyLoss()).items():
        inputs, grads = reference[name]
        _, _, r_out, r_in_inverse = dense_direction(inputs, grads, grad_w, None, "covariance", 0.05, 0.01)
        for _ in range(3):
            variation = torch.randn_like(grad_w)
            derivative = (grad_w * variation).sum()
            inner_product = torch.trace(r_in_inverse @ direction.T @ r_out @ variation)
            torch.testing.assert_close(inner_product, derivative, rtol=1e-8, atol=1e-12)


def test_frobenius_norm_diagnostic_is_the_induced_norm():
    model = mlp()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    optimizer = FrobeniusPreconditioner(model, lr=LR, track_diagnostics=True)
    directions = step_directions(model, optimizer, x, y, nn.CrossEntropyLoss())
    entry = optimizer.diagnostics[-1]["0"]
    weight, bias, grad_w, grad_b = directions["0"]
    assert entry["frobenius_norm"] == pytest.approx(float(((grad_w * weight).sum() + (grad_b * bias).sum()).sqrt()))
    assert entry["euclidean_norm"] == pytest.approx(float((grad_w.pow(2).sum() + grad_b.pow(2).sum()).sqrt()))
    assert entry["in_spectrum"].shape == (5,) and (entry["in_spectrum"][:-1] >= entry["in_spectrum"][1:]).all()


def single_layer_run(estimate, beta, interval, steps):
    """Train one Linear layer with MSE; return per-step (input operator, batch covariance) pairs."""
    torch.manual_seed(5)
    layer = nn.Linear(4, 2).double()
    optimizer = FrobeniusPreconditioner(layer, lr=0.01, estimate=estimate, beta=beta, update_interval=interval,
                                        damping_in=0.1, damping_out=0.1)
    history = []
    for step in range(steps):
        x = torch.randn(16, 4, dtype=torch.float64) * (step + 1)
        optimizer.zero_grad()
        nn.functional.mse_loss(layer(x), torch.zeros(16, 2, dtype=torch.float64)).backward()
        optimizer.step()
        history.append((optimizer.state[layer.weight]["in_operator"].clone(), x.T @ x / 16))
    return history


@pytest.mark.parametrize("estimate", ["batch", "ema", "ema_inverse"])
def test_averaging_and_update_interval(estimate):
    beta, interval = 0.3, 2
    history = single_layer_run(estimate, beta, interval, steps=5)
    identity = 0.1 * torch.eye(4, dtype=torch.float64)
    average, operator = None, None
    for step, (stored, batch_moment) in enumerate(history):
        if step % interval == 0:
            if estimate == "batch":
                operator = torch.linalg.inv(batch_moment + identity)
            elif estimate == "ema":
                # 16 samples of 4 features: a full-rank first estimate starts the average
                average = batch_moment if average is None else (1 - beta) * average + beta * batch_moment
                operator = torch.linalg.inv(average + identity)
            else:
                fresh = torch.linalg.inv(batch_moment + identity)
                operator = fresh if operator is None else (1 - beta) * operator + beta * fresh
        torch.testing.assert_close(stored, operator, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("estimate", ["ema", "ema_inverse"])
def test_first_averaged_refresh_does_not_amplify_directions_outside_the_batch_by_one_over_gamma(estimate):
    """Gaussian inputs, 784 features, batch 100: the first average must not be the rank-100 batch
    estimate, whose damped inverse scales the 684 directions outside the batch's span by 1/γ
    (averaged modes reuse it for update_interval steps of other batches)."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(784, 20), nn.ReLU(), nn.Linear(20, 10))
    beta, damping = 0.1, 0.01
    optimizer = FrobeniusPreconditioner(model, lr=1e-3, estimate=estimate, beta=beta, update_interval=10,
                                        damping_in=damping, damping_out=damping)
    x, y = torch.randn(100, 784), torch.randint(0, 10, (100,))
    nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    operator = optimizer.state[model[0].weight]["in_operator"].double()
    largest = torch.linalg.eigvalsh(operator).max()
    mean_eigenvalue = float(x.pow(2).sum() / 100 / 784)  # about 1 for standard normal inputs
    bound = (1 - beta) / (mean_eigenvalue + damping) + beta / damping if estimate == "ema_inverse" \
        else 1 / ((1 - beta) * mean_eigenvalue + damping)
    assert largest <= bound * (1 + 1e-3) and largest < 0.5 / damping


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_and_decoupled_weight_decay_act_on_the_preconditioned_direction(nesterov):
    """v ← μv + d, θ ← (1 − lr·λ)θ − lr·v (Nesterov: − lr·(d + μv)), with d the direction of a
    plain preconditioner at the same parameters and batch."""
    model = mlp()
    momentum, decay, lr = 0.9, 0.1, 0.05
    optimizer = FrobeniusPreconditioner(model, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=decay)
    velocity = {}
    torch.manual_seed(8)
    for _ in range(3):
        x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
        plain = copy.deepcopy(model)
        directions = step_directions(plain, FrobeniusPreconditioner(plain, lr=LR), x, y, nn.CrossEntropyLoss())
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        for name, (weight, bias, _, _) in directions.items():
            for kind, direction in (("weight", weight), ("bias", bias)):
                key = f"{name}.{kind}"
                velocity[key] = direction if key not in velocity else momentum * velocity[key] + direction
                step = direction + momentum * velocity[key] if nesterov else velocity[key]
                expected = (1 - lr * decay) * before[key] - lr * step
                torch.testing.assert_close(dict(model.named_parameters())[key].detach(), expected,
                                           rtol=1e-9, atol=1e-12)
    with pytest.raises(GraphgrowError, match="momentum > 0 for nesterov"):
        FrobeniusPreconditioner(mlp(), nesterov=True)


@pytest.mark.parametrize("options", [dict(estimate="ema"), dict(estimate="batch"), dict(estimate="ema", momentum=0.5),
                                     dict(estimate="batch", momentum=0.5), dict(estimate="ema", grad="direction")])
def test_state_dict_round_trip_continues_identically(options):
    """The statistics (averages, inverses, Woodbury samples) and momentum buffers are optimizer
    state: a run resumed from state_dict() between refreshes continues bit for bit."""
    model = mlp()
    optimizer = FrobeniusPreconditioner(model, lr=0.1, update_interval=3, **options)
    batches = [(torch.randn(3, 5, dtype=torch.float64), torch.randint(0, 3, (3,))) for _ in range(4)]
    for x, y in batches[:2]:
        step_directions(model, optimizer, x, y, nn.CrossEntropyLoss())
    clone = mlp(seed=1)  # a fresh module: a deepcopy would carry the first optimizer's hooks
    clone.load_state_dict(model.state_dict())
    restored = FrobeniusPreconditioner(clone, lr=0.7, update_interval=3, **options)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.param_groups[0]["lr"] == 0.1
    for x, y in batches[2:]:
        step_directions(model, optimizer, x, y, nn.CrossEntropyLoss())
        step_directions(clone, restored, x, y, nn.CrossEntropyLoss())
    for original, copied in zip(model.parameters(), clone.parameters()):
        torch.testing.assert_close(original, copied, rtol=0, atol=0)


def test_works_with_lr_scheduler_and_param_groups():
    model = mlp()
    optimizer = FrobeniusPreconditioner(model, params=[{"params": model[0].parameters(), "lr": 0.0},
                                                       {"params": list(model[2].parameters()) + list(model[4].parameters())}],
                                        lr=0.2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    frozen = model[0].weight.detach().clone()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    step_directions(model, optimizer, x, y, nn.CrossEntropyLoss())
    scheduler.step()
    assert optimizer.param_groups[1]["lr"] == pytest.approx(0.1)
    assert torch.equal(model[0].weight, frozen)


def test_singular_estimate_raises_damping_and_stays_finite():
    layer = nn.Linear(6, 3).double()
    x = torch.zeros(10, 6, dtype=torch.float64)
    x[:, 0] = 1.0  # centred covariance of the inputs is exactly zero
    optimizer = FrobeniusPreconditioner(layer, lr=0.1, moment="covariance", damping_in=0.0, damping_out=0.0,
                                        woodbury=False)
    optimizer.zero_grad()
    nn.functional.mse_loss(layer(x), torch.ones(10, 3, dtype=torch.float64)).backward()
    with pytest.warns(UserWarning, match="raising it"):
        optimizer.step()
    assert all(torch.isfinite(p).all() for p in layer.parameters())


def test_damping_warning_speaks_in_the_users_units_for_woodbury_inner_matrices():
    """The Woodbury inner matrix is the estimate over its scale s, damped by γ/s: a raise is
    reported as the γ the user set (γ = 0.01 here, inner damping 1e-4 at s = 100)."""
    layer = nn.Linear(4, 2).double()
    optimizer = FrobeniusPreconditioner(layer, lr=0.1, damping_in=0.01)
    indefinite = -torch.eye(3, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, inner_damping = optimizer._raised_damping_inverse(optimizer._records[0], "in", indefinite, 1e-4, 100.0)
    assert "at damping 0.01; raising it to 0.1" in str(caught[0].message)
    assert "at damping 0.1; raising it to 1" in str(caught[1].message)
    assert inner_damping > 1.0  # raised until -I + damping·I is positive definite


def test_non_finite_statistics_raise():
    layer = nn.Linear(3, 2).double()
    optimizer = FrobeniusPreconditioner(layer, lr=0.1)
    x = torch.tensor([[1.0, float("inf"), 0.0]], dtype=torch.float64)
    optimizer.zero_grad()
    layer(x).sum().backward()
    with pytest.raises(GraphgrowError, match="non-finite"):
        optimizer.step()


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
@pytest.mark.parametrize("batch", [2, 10])  # Woodbury (2 < 3 features) and dense factors
def test_single_non_finite_gradient_entry_raises(bad_value, batch):
    """The cheap finiteness check of the direction (its largest magnitude) catches one bad entry."""
    layer = nn.Linear(3, 2).double()
    optimizer = FrobeniusPreconditioner(layer, lr=0.1)
    optimizer.zero_grad()
    layer(torch.randn(batch, 3, dtype=torch.float64)).sum().backward()
    layer.weight.grad[1, 2] = bad_value
    with pytest.raises(GraphgrowError, match="non-finite preconditioned gradient"):
        optimizer.step()


def test_predefined_inner_products_mixed_with_data_driven():
    model = mlp()
    size = 5
    laplacian = 2 * torch.eye(size) - torch.diag(torch.ones(size - 1), 1) - torch.diag(torch.ones(size - 1), -1)
    sobolev = (torch.eye(size) + laplacian).double()  # discrete H¹ inner product on the input space
    output_metric = torch.diag(torch.arange(1.0, 8.0)).double()
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 3, (8,))
    reference = layer_samples(copy.deepcopy(model), x, lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))
    optimizer = FrobeniusPreconditioner(model, lr=LR, inner_products={model[0]: {"input": sobolev, "output": output_metric},
                                                                      "4": {"input": torch.eye(6)}})
    directions = step_directions(model, optimizer, x, y, nn.CrossEntropyLoss())
    weight, bias, grad_w, grad_b = directions["0"]
    torch.testing.assert_close(weight, torch.linalg.solve(output_metric, grad_w) @ sobolev)
    torch.testing.assert_close(bias, torch.linalg.solve(output_metric, grad_b))
    weight, bias, grad_w, grad_b = directions["4"]
    inputs, grads = reference["4"]
    _, expected_b, c_out, _ = dense_direction(inputs, grads, grad_w, grad_b, "second", 0.01, 0.01)
    torch.testing.assert_close(weight, torch.linalg.solve(c_out, grad_w))  # identity input inner product
    torch.testing.assert_close(bias, expected_b)


def test_inner_product_errors():
    model = mlp()
    with pytest.raises(GraphgrowError, match="not a preconditioned layer"):
        FrobeniusPreconditioner(model, inner_products={"nope": {"input": torch.eye(5)}})
    with pytest.raises(GraphgrowError, match="positive definite"):
        FrobeniusPreconditioner(model, inner_products={"0": {"input": -torch.eye(5)}})
    with pytest.raises(GraphgrowError, match="5x5"):
        FrobeniusPreconditioner(model, inner_products={"0": {"input": torch.eye(4)}})
    with pytest.raises(GraphgrowError, match="loss="):
        FrobeniusPreconditioner(model, labels="sampled")


def test_conv2d_kronecker_factors_of_unfolded_inputs():
    torch.manual_seed(6)
    conv = nn.Conv2d(2, 3, 3, padding=1).double()
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    before = conv.weight.detach().clone()
    optimizer = FrobeniusPreconditioner(conv, lr=LR)
    optimizer.zero_grad()
    output = conv(x)
    output.retain_grad()
    output.pow(2).mean().backward()
    grad_w = conv.weight.grad.reshape(3, -1).clone()
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 18)
    grads = output.grad.movedim(1, -1).reshape(-1, 3) * 2
    optimizer.step()
    expected, _, _, _ = dense_direction(patches, grads, grad_w, None, "second", 0.01, 0.01)
    torch.testing.assert_close(((before - conv.weight.detach()) / LR).reshape(3, -1), expected)


def test_residual_fx_graph_with_hooks_backend():
    torch.manual_seed(7)
    model = torch.fx.symbolic_trace(ResidualNet()).double()
    x, y = torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))
    reference = layer_samples(copy.deepcopy(model), x, lambda out: nn.functional.cross_entropy(out, y, reduction="sum"))
    optimizer = FrobeniusPreconditioner(model, lr=LR)
    directions = step_directions(model, optimizer, x, y, nn.CrossEntropyLoss())
    assert set(directions) == {"first", "block.inner", "block.outer", "last"}
    for name, (weight, bias, grad_w, grad_b) in directions.items():
        inputs, grads = reference[name]
        expected_w, expected_b, _, _ = dense_direction(inputs, grads, grad_w, grad_b, "second", 0.01, 0.01)
        torch.testing.assert_close(weight, expected_w)
        if bias is not None:
            torch.testing.assert_close(bias, expected_b)


def test_backpack_kflr_matches_exact_fisher_factor():
    from backpack import backpack, extend

    torch.manual_seed(8)
    plain = mlp()
    model = extend(torch.fx.symbolic_trace(copy.deepcopy(plain)), use_converter=True)
    loss_fn = extend(nn.CrossEntropyLoss())
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    probabilities = torch.softmax(plain(x), 1).detach()
    per_class = [layer_samples(copy.deepcopy(plain), x,
                               lambda out, c=c: nn.functional.cross_entropy(out, torch.full((5,), c), reduction="sum"))
                 for c in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer = FrobeniusPreconditioner(model, lr=LR, backend="backpack", labels="expected")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.zero_grad()
    with backpack(*optimizer.backpack_extensions()):
        loss_fn(model(x), y).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    optimizer.step()
    for name in ("0", "2", "4"):
        inputs = per_class[0][name][0]
        # exact Fisher factor: E_n E_{c~p(c|x_n)} g_{n,c} g_{n,c}ᵀ
        fisher = sum((probabilities[:, c, None, None] * torch.einsum("ni,nj->nij", per_class[c][name][1],
                                                                      per_class[c][name][1])).mean(0) for c in range(3))
        c_out = fisher + 0.01 * torch.eye(fisher.shape[0], dtype=torch.float64)
        c_in = inputs.T @ inputs / 5 + 0.01 * torch.eye(inputs.shape[1], dtype=torch.float64)
        expected = torch.linalg.solve(c_out, grads[f"{name}.weight"]) @ torch.linalg.inv(c_in)
        module = dict(model.named_modules())[name]
        torch.testing.assert_close((before[f"{name}.weight"] - module.weight.detach()) / LR, expected)


def test_backpack_backend_refuses_residual_graphs_and_unextended_models():
    from backpack import extend

    residual = extend(torch.fx.symbolic_trace(ResidualNet()), use_converter=True)
    with pytest.raises(GraphgrowError, match="branching"):
        FrobeniusPreconditioner(residual, backend="backpack", labels="sampled")
    with pytest.raises(GraphgrowError, match="not extended"):
        FrobeniusPreconditioner(mlp(), backend="backpack", labels="sampled")
    with pytest.raises(GraphgrowError, match="second moments"):
        FrobeniusPreconditioner(mlp(), backend="backpack", moment="covariance", labels="sampled")


def test_other_layers_fall_back_to_sgd_with_one_warning():
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2)).double()
    with pytest.warns(UserWarning, match="plain SGD.*1.weight, 1.bias"):
        optimizer = FrobeniusPreconditioner(model, lr=LR)
    norm_before = model[1].weight.detach().clone()
    optimizer.zero_grad()
    model(torch.randn(5, 3, dtype=torch.float64)).pow(2).mean().backward()
    grad = model[1].weight.grad.clone()
    optimizer.step()
    torch.testing.assert_close(model[1].weight.detach(), norm_before - LR * grad)


class AttentionThenLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.attn(x, x, x, need_weights=False)[0])


def test_the_out_projection_of_multihead_attention_takes_a_plain_step():
    """nn.MultiheadAttention applies out_proj's weights itself (its forward never runs, so no
    statistics are recorded for it): a plain SGD step with the warning, the head preconditioned.
    Before, every step raised 'no recorded pre-activation gradients' for it."""
    model = AttentionThenLinear().double()
    with pytest.warns(UserWarning, match="plain SGD.*attn.out_proj.weight, attn.out_proj.bias"):
        optimizer = FrobeniusPreconditioner(model, lr=LR)
    assert [record.name for record in optimizer._records] == ["head"]
    before = model.attn.out_proj.weight.detach().clone()
    optimizer.zero_grad()
    model(torch.randn(5, 3, 4, dtype=torch.float64)).pow(2).mean().backward()
    grad = model.attn.out_proj.weight.grad.clone()
    optimizer.step()
    torch.testing.assert_close(model.attn.out_proj.weight.detach(), before - LR * grad)


def test_step_without_recorded_statistics_raises():
    layer = nn.Linear(3, 2).double()
    optimizer = FrobeniusPreconditioner(layer, lr=0.1)
    layer.weight.grad = torch.ones_like(layer.weight)
    with pytest.raises(GraphgrowError, match="no recorded"):
        optimizer.step()


def test_deepcopy_of_the_model_does_not_feed_the_optimizer():
    model = mlp()
    optimizer = FrobeniusPreconditioner(model, lr=LR, labels="sampled", loss=nn.CrossEntropyLoss())
    clone = copy.deepcopy(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    nn.functional.cross_entropy(clone(x), y).backward()
    assert all(not record.inputs and not record.output_grads for record in optimizer._records)


def test_backpack_backend_on_a_compiled_spec_matches_the_plain_model():
    """Compiled networks call activations and flatten as functions, which BackPACK's converter
    cannot handle; ``stateless_as_modules=True`` compiles them as modules instead."""
    from backpack import backpack, extend

    from graphgrow import compile_graph, graph_from_text

    graph = graph_from_text("graphgrow: 1\nname: small\ninput: {shape: [1, 2, 3]}\nlayers:\n"
                            "  - {name: flat, op: flatten}\n  - {name: fc1, op: linear, out: 4}\n"
                            "  - {name: act1, op: relu}\n  - {name: head, op: linear, out: 3}\n")
    compiled = compile_graph(graph, seed=2, dtype=torch.float64, stateless_as_modules=True)
    plain = nn.Sequential(nn.Flatten(), nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    plain.load_state_dict({k.replace("fc1", "1").replace("head", "3"): v
                           for k, v in compiled.state_dict().items()})
    x, y = torch.randn(7, 1, 2, 3, dtype=torch.float64), torch.randint(0, 3, (7,))
    initial = [p.detach().clone() for p in compiled.parameters()]
    assert [n.op for n in compiled.graph.nodes].count("call_module") == 4
    updated = []
    for model in (compiled, torch.fx.symbolic_trace(plain)):
        model = extend(model, use_converter=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            optimizer = FrobeniusPreconditioner(model, lr=LR, backend="backpack", labels="expected")
        optimizer.zero_grad()
        with backpack(*optimizer.backpack_extensions()):
            extend(nn.CrossEntropyLoss())(model(x), y).backward()
        optimizer.step()
        updated.append([p.detach().clone() for p in model.parameters()])
    for mine, reference, start in zip(*updated, initial):
        torch.testing.assert_close(mine, reference)
        assert not torch.equal(mine, start)


def test_spectrum_diagnostic_survives_degenerate_estimates():
    """Pre-activation gradient samples recorded in a real run (784-100-100-100-10 ReLU on MNIST,
    Monte-Carlo labels): 98 % of the entries are zero (dead units), the rest about 1e-12. Single
    precision eigvalsh failed to converge on their second moment and stopped training; the
    diagnostic takes the spectrum in float64."""
    from pathlib import Path
    stored = torch.load(Path(__file__).parent / "data" / "degenerate_gradient_samples.pt")
    samples = torch.zeros(stored["shape"])
    samples[tuple(stored["indices"])] = stored["values"]
    spectrum = FrobeniusPreconditioner._spectrum(samples, 100.0, None)
    expected = torch.linalg.eigvalsh(samples.double().T @ samples.double() * 100.0).flip(0).clamp_min(0)
    torch.testing.assert_close(spectrum.double(), expected, rtol=1e-5, atol=1e-30)
