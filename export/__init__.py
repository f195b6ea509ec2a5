"""vl2edge.export: checkpoint -> split ONNX artifact (see exporter.py). Needs the [export] extra (torch, onnx)."""
