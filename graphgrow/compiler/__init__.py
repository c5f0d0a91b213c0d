"""Layer 2: a LayerGraph and its parameters become a ``torch.fx.GraphModule`` (``network``), are
saved and loaded as YAML + weights (``io``), exported to TorchScript and ``torch.export``
(``export``), and imported from a user's ``nn.Module`` (``importer``)."""
from .network import Network, compile_graph

__all__ = ["Network", "compile_graph"]
