"""lookalike.encoders."""
