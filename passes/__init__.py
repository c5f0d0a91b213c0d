"""Function-preserving graph rewrites of graphgrow networks and the transfer of parameters and
optimizer state across them (see docs/passes.md).

Every pass takes a ``graphgrow.Network`` and options and returns ``(new network, Record)``; the
input network is left unchanged."""
from .blocks import Block, BlockPlan, block_at, block_boundaries, block_candidates, find_blocks, insert_block, plan_block
from .extend import candidate_gradient, extend_all, head_layers, keep_candidates, legal_positions, widenable
from .hierarchy import (Level, Transfer, build_hierarchy, coarsen_depth, coarsen_width, depth_prolongation,
                        residual_stages, strongest_pairs, unit_matrices)
from .insert import insert_identity, plan_identity
from .manager import PASSES, Pipeline, Step, register_pass, verify_pass
from .optim import record_by_name, transfer_optimizer
from .prune import identity_distances, prune, unit_scores
from .record import CandidateInfo, Origin, Record
from .units import trace_units
from .widen import widen

__all__ = ["Block", "BlockPlan", "block_at", "block_boundaries", "block_candidates", "find_blocks", "insert_block", "plan_block", "CandidateInfo", "Level", "Origin", "PASSES", "Pipeline", "Record", "Step", "Transfer",
           "build_hierarchy", "candidate_gradient", "coarsen_depth", "coarsen_width", "depth_prolongation",
           "extend_all", "head_layers", "identity_distances", "insert_identity", "keep_candidates", "legal_positions", "plan_identity",
           "prune", "record_by_name", "register_pass", "residual_stages", "strongest_pairs", "trace_units", "transfer_optimizer",
           "unit_matrices", "unit_scores", "verify_pass", "widen", "widenable"]
