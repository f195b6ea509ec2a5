"""vl2edge: DeepSeek-VL2 on small machines.

Subpackages, in the direction data flows:
  vl2edge.model   - HF checkpoint I/O, the checkpoint synthesizer, the PyTorch reference model
  vl2edge.quant   - numpy block quantizers in ONNX Runtime's layouts
  vl2edge.export  - checkpoint -> split ONNX artifact
  vl2edge.runtime - the torch-free runtime
  vl2edge.bench   - benchmarks
"""

__version__ = "0.1.0"


def load(path, provider=None, threads=None, max_tiles=None, verify="sha256", **options):
    """Open an exported artifact: `vl2edge.load(path) -> vl2edge.runtime.api.Model` (see that module for the
    options: transient_vision, official_pixels).

    Imported lazily, so `import vl2edge` stays light and torch-free."""
    from .runtime.api import load as _load

    return _load(path, provider=provider, threads=threads, max_tiles=max_tiles, verify=verify, **options)
