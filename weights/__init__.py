"""lookalike.weights."""
