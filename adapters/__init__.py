"""lookalike.adapters."""
