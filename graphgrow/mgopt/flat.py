"""Parameters of a network level as one flat vector, and transfers compiled to index operations
on such vectors.

The multilevel optimiser does all its arithmetic on parameter dicts; a dict with the single key
``FLAT`` makes each of those one tensor operation instead of one per parameter (a 256-block
ResNet has 514). The network sees views into the vector (:meth:`FlatLayout.views`), and autograd
returns the gradient as one vector too.

A :class:`FlatTransfer` turns the linear maps of a ``passes`` transfer into, per direction, one
gather of the whole vector plus, per group of stacked blocks whose rows are not plain copies,
one weighted sum over the few nonzeros of each row (R = P^T / 2 has two per row). Injection and
constant interpolation are plain copies (each row of R or P holds a single one), so they become
a single gather. Maps that act along a unit axis (width
hierarchies) are applied to the views and concatenated: one copy in, one out.
"""
from __future__ import annotations

import torch

from passes.hierarchy import StackMap

FLAT = "flat"


class FlatLayout:
    """Names, shapes and offsets of a module's trainable parameters in one flat vector."""

    def __init__(self, module: torch.nn.Module):
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in params]
        self.shapes = [tuple(p.shape) for _, p in params]
        self.sizes = [p.numel() for _, p in params]
        self.offsets = dict(zip(self.names, torch.tensor([0] + self.sizes[:-1]).cumsum(0).tolist()))
        self.numel = sum(self.sizes)

    def flatten(self, named: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([named[n].detach().reshape(-1) for n in self.names])

    def views(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` sharing storage (and autograd history) with ``flat``."""
        return {n: part.view(shape) for n, part, shape in zip(self.names, flat.split(self.sizes), self.shapes)}

    def index(self, name: str) -> torch.Tensor:
        start = self.offsets[name]
        return torch.arange(start, start + self.sizes[self.names.index(name)])


class _Direction:
    """dst = src[gather], then for each group of blocks that mixes rows,
    dst[rows_dst[i]] = sum_k weights[i, k] src[sources[i, k]] (the nonzeros of row i of R or P)."""

    def __init__(self, size: int, gather: torch.Tensor, mixed: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self.size, self.gather, self.mixed = size, gather, mixed
        # operations per application: one per element moved, two per multiply-add
        self.operations = size + sum(2 * sources.numel() for _, sources, _ in mixed)

    def __call__(self, src: torch.Tensor) -> torch.Tensor:
        dst = src[self.gather]
        for weights, sources, rows_dst in self.mixed:
            dst[rows_dst] = (weights.unsqueeze(-1) * src[sources]).sum(1)
        return dst

    def to(self, device, dtype) -> "_Direction":
        self.gather = self.gather.to(device)
        self.mixed = [(w.to(device, dtype), s.to(device), d.to(device)) for w, s, d in self.mixed]
        return self


def _row_nonzeros(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Columns and values of the nonzeros of each row, padded to the longest row with weight 0."""
    width = int((matrix != 0).sum(1).max())
    columns = torch.zeros(matrix.shape[0], width, dtype=torch.long)
    weights = torch.zeros(matrix.shape[0], width, dtype=matrix.dtype)
    for i, row in enumerate(matrix):
        nonzero = row.nonzero().flatten()
        columns[i, :len(nonzero)] = nonzero
        weights[i, :len(nonzero)] = row[nonzero]
    return columns, weights


def _selection(matrix: torch.Tensor) -> torch.Tensor | None:
    """For a matrix whose every row is a single 1 (a copy), the column of each row."""
    nonzero = matrix != 0
    if (nonzero.sum(1) == 1).all() and (matrix[nonzero] == 1).all():
        return nonzero.float().argmax(1)
    return None


def _compile(stacks: list[StackMap], src: FlatLayout, dst: FlatLayout, restrict: bool) -> _Direction:
    gather = torch.zeros(dst.numel, dtype=torch.long)
    covered = set()
    groups: dict[tuple[int, int], list[StackMap]] = {}  # maps sharing P and R: the roles of one stage
    for stack in stacks:
        groups.setdefault((id(stack.P), id(stack.R)), []).append(stack)
    mixed = []
    for group in groups.values():
        src_names = [s.fine if restrict else s.coarse for s in group]
        dst_names = [s.coarse if restrict else s.fine for s in group]
        # one row per block, the roles of that block side by side
        rows_src = torch.stack([torch.cat([src.index(names[k]) for names in src_names])
                                for k in range(len(src_names[0]))])
        rows_dst = torch.stack([torch.cat([dst.index(names[k]) for names in dst_names])
                                for k in range(len(dst_names[0]))])
        matrix = group[0].R if restrict else group[0].P
        selected = _selection(matrix)
        if selected is not None:
            gather[rows_dst.reshape(-1)] = rows_src[selected].reshape(-1)
        else:  # rows of a block with the roles side by side: (blocks, nonzeros, block size) sources
            columns, weights = _row_nonzeros(matrix)
            mixed.append((weights, rows_src[columns], rows_dst))
        covered.update(n for names in dst_names for n in names)
    for name in dst.names:  # parameters outside the maps pass unchanged
        if name not in covered:
            gather[dst.index(name)] = src.index(name)
    return _Direction(dst.numel, gather, mixed)


class FlatTransfer:
    """A ``passes`` transfer (R_p = R_g, P) on flat parameter vectors.

    ``cost``: work units of one application (operations of the larger direction relative to the
    ``reference_operations`` of one fine gradient evaluation), so that transfers are counted in
    the work ledger."""

    def __init__(self, transfer, fine: FlatLayout, coarse: FlatLayout, *, reference_operations: float,
                 device=None, dtype=None):
        self.named = transfer  # the dict form, kept for maps that are not stacks (and for tests)
        self.fine, self.coarse = fine, coarse
        self.compiled = all(isinstance(m, StackMap) for m in transfer.maps)
        if self.compiled:
            self._restrict = _compile(transfer.maps, fine, coarse, True).to(device, dtype)
            self._prolong = _compile(transfer.maps, coarse, fine, False).to(device, dtype)
            operations = max(self._restrict.operations, self._prolong.operations)
        else:
            operations = 2 * (fine.numel + coarse.numel)  # views in, one concatenation out
        self.cost = operations / reference_operations

    def restrict(self, fine: dict) -> dict:
        if self.compiled:
            return {FLAT: self._restrict(fine[FLAT])}
        return {FLAT: self.coarse.flatten(self.named.restrict(self.fine.views(fine[FLAT])))}

    restrict_gradient = restrict  # R_g = R_p (thesis Examples 3.35-3.36)

    def prolong(self, coarse: dict) -> dict:
        if self.compiled:
            return {FLAT: self._prolong(coarse[FLAT])}
        return {FLAT: self.fine.flatten(self.named.prolong(self.coarse.views(coarse[FLAT])))}
