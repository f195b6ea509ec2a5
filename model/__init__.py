"""vl2edge.model: checkpoint I/O, synthesizer, PyTorch reference (see README)."""
