"""vl2edge: DeepSeek-VL2 on small machines.

Subpackages, in the direction data flows:
  vl2edge.model    - HF checkpoint I/O, the checkpoint synthesizer, the PyTorch reference model
  vl2edge.quant    - numpy block quantizers in ONNX Runtime's layouts
  vl2edge.contract - the artifact format as code (manifest, onnxruntime floors, cache binding, routing feed)
  vl2edge.export   - checkpoint -> split ONNX artifact
  vl2edge.runtime  - the torch-free runtime
  vl2edge.serve    - `vl2edge serve`, an application of the runtime: an OpenAI-compatible HTTP API
  vl2edge.bench    - benchmarks

What an application imports (the documented surface; vl2edge.serve uses nothing else of the runtime):
  load(path, ...) -> Model                 open an artifact (runtime/api.py)
  Model, Stream, Result                    generate / chat / ground; a streaming request; its outcome
  Box, GroundingParser                     grounding boxes, and the incremental parser that finds them in a stream
  IMAGE_TAG                                the image placeholder of the chat template ("<image>")
  Frame                                    a numpy frame with its channel order: Frame(array, "bgr") for OpenCV's
  SourceError                              a frame source (Model.watch) that cannot be opened
  ImageError, PromptTooLongError, TemplateError   the errors a request's input can raise (all ValueErrors)
They are imported on first use, so `import vl2edge` stays light and torch-free.
"""

__version__ = "0.1.0"

# name -> (module under vl2edge, attribute)
_SURFACE = {
    "Model": ("runtime.api", "Model"),
    "Stream": ("runtime.generation", "Stream"),
    "Result": ("runtime.generation", "Result"),
    "Box": ("runtime.grounding", "Box"),
    "GroundingParser": ("runtime.grounding", "GroundingParser"),
    "IMAGE_TAG": ("runtime.chat_template", "IMAGE_TAG"),
    "ImageError": ("runtime.images", "ImageError"),
    "Frame": ("runtime.frames", "Frame"),
    "SourceError": ("runtime.frame_sources", "SourceError"),
    "PromptTooLongError": ("runtime.processor", "PromptTooLongError"),
    "TemplateError": ("runtime.chat_template", "TemplateError"),
}
__all__ = ["load", *_SURFACE]


def load(path, provider=None, threads=None, max_tiles=None, verify="sha256", **options):
    """Open an exported artifact: `vl2edge.load(path) -> Model` (runtime/api.py has the options: transient_vision,
    official_pixels, low_memory)."""
    from .runtime.api import load as _load

    return _load(path, provider=provider, threads=threads, max_tiles=max_tiles, verify=verify, **options)


def __getattr__(name):
    if name not in _SURFACE:
        raise AttributeError(f"module 'vl2edge' has no attribute {name!r}")
    import importlib

    module, attr = _SURFACE[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), attr)
