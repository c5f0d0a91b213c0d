"""Save and load networks as YAML + weights; dump a LayerGraph back to spec text."""
from __future__ import annotations

import os
from pathlib import Path

import torch
import yaml

from .network import Network
from ..errors import GraphgrowError
from ..ir import INPUT, LayerGraph, graph_from_text, load_graph
from ..ops.base import REQUIRED
from ..spec import FORMAT_VERSION

WEIGHTS_SUFFIX = ".pt"


def _flow(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10**9).strip()


def dump(graph: LayerGraph) -> str:
    """Spec text (format version 1, flat: variables and repeats expanded) that loads back to
    the same graph. Arguments equal to their defaults are left out."""
    # "name: x" via a flow mapping, so names YAML would misread ('yes', 'null') come out quoted
    lines = [f"graphgrow: {FORMAT_VERSION}", _flow({"name": graph.name})[1:-1],
             f"input: {{shape: {_flow(list(graph.input_shape))}"
             + (f", tokens: {graph.input_tokens}}}" if graph.input_tokens else "}"), "layers:"]
    previous = INPUT
    for node in graph.nodes:
        item = {"name": node.name, "op": node.op}
        if node.inputs != [previous]:
            item["inputs"] = list(node.inputs)
        defaults = {a.name: a.default for a in node.opdef.args}
        item.update({k: v for k, v in node.args.items()
                     if defaults.get(k, REQUIRED) is REQUIRED or defaults[k] != v})
        if node.init is not None:
            item["init"] = node.init
        if node.frozen:
            item["frozen"] = True
        lines.append(f"  - {_flow(item)}")
        previous = node.name
    lines.append(f"outputs: {_flow(list(graph.outputs))}")
    return "\n".join(lines) + "\n"


def ensure_directory(directory: str | Path, *, option: str, what: str) -> Path:
    """Create ``directory`` and its parents, or one GraphgrowError naming ``option`` that says
    why not (a parent is a file, no permission, read-only file system)."""
    directory = Path(directory)
    blocker = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), None)
    if blocker is not None:
        raise GraphgrowError(f"cannot create the {what}: {blocker} is a file", file=str(directory), option=option,
                             hint=f"choose an --{option} under a directory")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise GraphgrowError(f"cannot create the {what}: {err.strerror or err}", file=str(directory), option=option,
                             hint=f"choose an --{option} in a writable place") from None
    if not os.access(directory, os.W_OK):
        raise GraphgrowError(f"the {what} is not writable", file=str(directory), option=option,
                             hint=f"choose an --{option} in a writable place")
    return directory


def weights_path(spec_path: str | Path) -> Path:
    return Path(spec_path).with_suffix(WEIGHTS_SUFFIX)


def save(network: Network, spec_path: str | Path) -> tuple[Path, Path]:
    """Write ``spec_path`` (YAML) and the weights beside it (same stem, ``.pt``)."""
    spec_path = Path(spec_path)
    weights = weights_path(spec_path)
    if weights == spec_path:  # the weights would overwrite the spec just written
        raise GraphgrowError(f"spec path must not end in {WEIGHTS_SUFFIX}", file=str(spec_path),
                             hint=f"save as {spec_path.with_suffix('.yaml').name}; the weights go beside it")
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(dump(network.graph), encoding="utf-8")
    torch.save({k: v.detach().cpu() for k, v in network.state().items()}, weights)
    return spec_path, weights


def load_weights(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise GraphgrowError("weights file not found", file=str(path), hint="check the path")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for corrupt or foreign files
        raise GraphgrowError(f"cannot read weights: {err.__class__.__name__}: {str(err)[:200]}",
                             file=str(path), hint="weights are written by graphgrow save") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise GraphgrowError("weights file does not hold a dict of tensors", file=str(path))
    for key, tensor in state.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise GraphgrowError(f"weight '{key}' holds NaN or infinite values", file=str(path),
                                 node=str(key).split(".")[0], hint="the run that wrote them diverged; use earlier weights")
    return state


def load(spec_path: str | Path, weights: str | Path | None = None, *, seed: int = 0) -> Network:
    """Load a network from its spec, with weights from ``weights`` or, if None, from the
    ``.pt`` file beside the spec when it exists (else initialised from ``seed``)."""
    graph = load_graph(spec_path)
    if weights is None and weights_path(spec_path).exists():
        weights = weights_path(spec_path)
    state = load_weights(weights) if weights is not None else None
    return Network.build(graph, state, seed=seed)


def reload_graph(graph: LayerGraph) -> LayerGraph:
    """Dump and read back (used to check round trips)."""
    return graph_from_text(dump(graph), graph.source)


def load_network(spec, seed: int = 0, weights=None):
    """A Network from a spec path (weights beside it or given), a LayerGraph or a Network."""
    if isinstance(spec, Network):
        return spec
    if isinstance(spec, LayerGraph):
        return Network.build(spec, seed=seed)
    return load(spec, weights, seed=seed)
