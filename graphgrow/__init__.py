"""graphgrow: networks that change shape while they train.

Core API (layers 1-2 only, so ``passes`` and the engines can import this package freely):
``load_graph``/``graph_from_text`` read a spec into a LayerGraph, ``compile_graph`` and
``Network.build`` compile it, ``save``/``load``/``dump`` round-trip it, ``register_op`` adds ops.
"""
from .compiler.network import Network, compile_graph
from .errors import GraphgrowError
from .compiler.io import dump, load, save
from .ir import INPUT, LayerGraph, Node, build_graph, graph_from_text, load_graph
from .ops import OpDef, get_op, register_op, registered_ops

__version__ = "0.1.0"
__all__ = ["GraphgrowError", "INPUT", "LayerGraph", "Network", "Node", "OpDef", "build_graph",
           "compile_graph", "dump", "get_op", "graph_from_text", "load", "load_graph",
           "register_op", "registered_ops", "save"]
