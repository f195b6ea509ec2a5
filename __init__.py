"""vl2edge: DeepSeek-VL2 on small machines.

Subpackages, in the direction data flows:
  vl2edge.model   - HF checkpoint I/O, the checkpoint synthesizer, the PyTorch reference model
  vl2edge.quant   - numpy block quantizers in ONNX Runtime's layouts
  vl2edge.export  - checkpoint -> split ONNX artifact
  vl2edge.runtime - the torch-free runtime
  vl2edge.bench   - benchmarks
"""

__version__ = "0.1.0"
