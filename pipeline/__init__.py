"""lookalike.pipeline."""
