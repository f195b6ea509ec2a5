"""vl2edge.bench (see README)."""
