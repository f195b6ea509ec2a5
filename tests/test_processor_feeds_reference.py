"""PreparedInputs from the runtime Processor run through the PyTorch reference model for every test preset."""

from __future__ import annotations

import pytest
from PIL import Image

torch = pytest.importorskip("torch")

from vl2edge.model.vl2 import DeepseekVL2  # noqa: E402
from vl2edge.runtime.processor import Processor  # noqa: E402

REQUESTS = [
    ("<image>\nWhat is on the table?", [(640, 480)]),  # 2x2 tiling
    ("<image><image>\nCompare.", [(768, 384), (300, 300)]),  # two images, still tiled
    ("<image>\n<image>\n<image>\nWhat changed?", [(50, 90)] * 3),  # no tiling
    ("Just text.", []),  # no image at all
]


@pytest.mark.parametrize("preset", ["test-tiny", "test-small", "test-vl2"])
def test_reference_model_consumes_prepared_inputs(test_checkpoints, preset):
    ckpt = test_checkpoints[preset]
    proc = Processor.from_dir(ckpt)  # a checkpoint directory holds everything the processor reads
    model = DeepseekVL2.from_checkpoint(ckpt)
    for content, sizes in REQUESTS:
        inputs = proc(content, images=[Image.new("RGB", s, (30, 160, 90)) for s in sizes])
        logits = model(inputs.input_ids, inputs.pixel_values, inputs.images_seq_mask, inputs.images_spatial_crop)
        assert logits.shape[:2] == (1, inputs.seq_len)
        assert bool(torch.isfinite(logits).all())
