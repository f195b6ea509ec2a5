"""vl2edge.quant (see README)."""
