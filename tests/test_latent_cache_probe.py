"""The sharp-attention family (model/synth.py, init="sharp") and the probe that attributes the 8-bit latent cache's
error to each of its quantizations (bench/probes/latent_cache_error.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vl2edge.bench.probes import latent_cache_error as probe


@pytest.fixture(scope="module")
def sharp_small(tmp_path_factory):
    from vl2edge.model.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("sharp") / "test-small-sharp", "test-small", seed=3, progress=False,
                      init="sharp")


def _steps(checkpoint, steps=4):
    from vl2edge.bench.heldout import heldout_inputs
    from vl2edge.model.vl2 import DeepseekVL2
    from vl2edge.runtime.processor import Processor

    model = DeepseekVL2.from_checkpoint(checkpoint)
    inp = heldout_inputs(Processor.from_dir(checkpoint))[0]  # long prose
    return model.cfg.language, probe.capture(model, inp, steps)


def _score_std(calls) -> float:
    return float(np.concatenate([(scale * q @ cache.T).ravel() for q, cache, scale in calls]).std())


def test_sharp_attention_has_scores_of_std_near_3(sharp_small, test_checkpoints):
    from vl2edge.model.checkpoint import Checkpoint

    _, sharp = _steps(sharp_small)
    _, flat = _steps(test_checkpoints["test-small"])
    for layer in sharp:
        assert 2.4 < _score_std(sharp[layer]) < 4.0 and _score_std(flat[layer]) < 1.5
    ck = Checkpoint.open(sharp_small)
    gains = ck.tensor("language.model.layers.0.input_layernorm.weight").float()
    assert 0.6 <= gains.min() < 0.7 and 1.3 < gains.max() <= 1.4  # spread uniformly over 0.6-1.4


def test_attend_is_the_reference_attention(sharp_small):
    """The probe's exact product is torch's scaled_dot_product_attention over the same latents."""
    L, calls = _steps(sharp_small, steps=2)
    r = L.kv_lora_rank
    for q, cache, scale in calls[0]:
        kv = torch.from_numpy(cache)[None, None]
        want = F.scaled_dot_product_attention(torch.from_numpy(q)[None, :, None], kv, kv[..., :r], scale=scale)
        np.testing.assert_allclose(probe.attend(q, cache, scale, r), want[0, :, 0].numpy(), rtol=1e-4, atol=1e-5)


def test_blocks_of_probabilities_cut_their_error_on_sharp_attention(sharp_small):
    """Which quantization dominates varies with the checkpoint and the conversation (docs/precision.md has the
    table); what holds is that the uint8 probabilities lose more than a little, and one scale per 64-token block
    instead of one per head recovers most of it."""
    L, calls = _steps(sharp_small, steps=4)
    from vl2edge.export.kv_calibration import latent_scales

    errs: dict[str, list] = {}
    for layer, steps in calls.items():
        chan = latent_scales(steps[-1][1], L.kv_lora_rank)
        for q, cache, scale in steps:
            for k, v in probe.step_errors(q, cache, scale, L.kv_lora_rank, chan).items():
                errs.setdefault(k, []).append(v)
    mean = {k: float(np.concatenate(v).mean()) for k, v in errs.items()}
    assert mean["probs"] > 0.004 and mean["probs, block"] < mean["probs"] / 2
    assert mean["all"] > max(mean["cache rows"], mean["queries"], mean["probs"])


def test_blockwise_probabilities_keep_a_long_tail():
    """Hand-made: one peak and 4,000 tokens of p = 1e-3 (below max/510): per head they vanish, per block they stay."""
    p = np.full((1, 4001), 1e-3)
    p[0, 17] = 1.0
    assert probe._p8(p)[0, 18:].sum() == 0  # what one scale per head keeps of the tail: nothing
    np.testing.assert_allclose(probe._p8(p, 64)[0, 64:], p[0, 64:], rtol=2e-3)  # all but the peak's own block
