"""RMNTR: the recursive multilevel proximal trust-region method (seed 002) for f + beta ||.||_1."""
