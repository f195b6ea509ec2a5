"""vl2edge.export (see README)."""
