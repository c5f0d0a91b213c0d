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

Public entry points for the CLI: ``grow`` and ``sensitivities``. The folder: ``norms`` (4.17,
B.1a-e), ``sensitivity`` (the gradient pass and selection), ``growth`` (the hook of Algorithm 6
and ``grow``), ``widening`` (neurons, 4.4).
"""
from ..compiler.io import load_network
from ..runtime.data import load_data
from .growth import GrowResult, GrowthHook, grow
from .norms import MERIT_NORMS, conv_operator_norm, gradient_norm, top_eigenvalue
from .sensitivity import (CANDIDATE_KINDS, STRATEGIES, Candidate, Geometry, Sensitivities, Tap, existing_weights,
                          full_data_gradients, insert_candidates, sample_rows, select, sensitivities)
from .widening import (NEURON_INITS, NeuronCandidate, cross_term, gradmax_rows, neuron_positions, neuron_sensitivities,
                       widen_best)

__all__ = ["CANDIDATE_KINDS", "Candidate", "Geometry", "GrowResult", "GrowthHook", "MERIT_NORMS", "NEURON_INITS", "NeuronCandidate", "STRATEGIES",
           "Sensitivities", "Tap", "conv_operator_norm", "cross_term", "existing_weights", "full_data_gradients", "gradmax_rows",
           "gradient_norm", "grow", "insert_candidates", "load_data", "load_network", "neuron_positions", "neuron_sensitivities",
           "sample_rows", "select", "sensitivities", "top_eigenvalue", "widen_best"]
