"""runtime/sampling.py: the numpy sampler against hand-computed cases and the PyTorch reference's next_token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vl2edge.model.generate import SamplingConfig, next_token
from vl2edge.runtime.sampling import Sampler, SamplingParams, apply_repetition_penalty, filter_logits


def probs(logits, seen=(), **kw):
    return Sampler(SamplingParams(**kw)).probabilities(np.asarray(logits, np.float32), seen)


def torch_next(logits, seen=(), seed=0, **kw):
    gen = torch.Generator().manual_seed(seed)
    return next_token(torch.tensor(logits, dtype=torch.float32), torch.tensor(list(seen), dtype=torch.long),
                      SamplingConfig(**kw), gen)


def test_repetition_penalty_by_hand():
    out = apply_repetition_penalty(np.array([2.0, -2.0, 1.0, 0.5], np.float32), [0, 1, 1, 0], 2.0)
    assert out.tolist() == [1.0, -4.0, 1.0, 0.5]  # each seen id once, however often it was seen
    # greedy after the penalty: token 0 (2.0 -> 1.0) ties token 2 (1.0); the lower id wins, as torch.argmax
    assert Sampler(SamplingParams(repetition_penalty=2.0))(np.array([2.0, -2.0, 1.0, 0.5]), [0]) == 0
    assert Sampler(SamplingParams(repetition_penalty=2.5))(np.array([2.0, -2.0, 1.0, 0.5]), [0]) == 2


def test_top_k_keeps_ties_and_top_p_by_hand():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    # top_p: drop the tail whose cumulative probability is <= 1 - top_p (ascending order), keep the rest
    assert np.flatnonzero(probs(logits, temperature=1.0, top_p=0.8)).tolist() == [0, 1]  # 0.05 + 0.15 <= 0.2
    assert np.flatnonzero(probs(logits, temperature=1.0, top_p=0.9)).tolist() == [0, 1, 2]  # 0.05 <= 0.1
    assert np.flatnonzero(probs(logits, temperature=1.0, top_p=0.01)).tolist() == [0]  # the top token always stays
    p = probs(logits, temperature=1.0, top_p=0.8)
    np.testing.assert_allclose(p[:2], [0.5 / 0.8, 0.3 / 0.8], rtol=1e-6)
    # top_k keeps every token tied with the k-th
    assert np.flatnonzero(probs([3.0, 1.0, 3.0, 3.0, 0.0], temperature=1.0, top_k=1)).tolist() == [0, 2, 3]
    p = probs([2.0, 1.0, 0.0], temperature=0.5, top_k=2)
    np.testing.assert_allclose(p, [np.exp(4) / (np.exp(4) + np.exp(2)), np.exp(2) / (np.exp(4) + np.exp(2)), 0],
                               rtol=1e-6)
    assert np.isneginf(filter_logits(np.array([1.0, 2.0, 3.0]), SamplingParams(temperature=1, top_k=2))[0])


@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_and_deterministic_settings_match_the_reference(penalty):
    rng = np.random.default_rng(1)
    for _ in range(20):
        logits = rng.normal(size=300).astype(np.float32) * 3
        seen = rng.integers(0, 300, 40).tolist()
        kw = {"repetition_penalty": penalty}
        ours = Sampler(SamplingParams(**kw))(logits, seen)
        assert ours == torch_next(logits, seen, **kw)
        for det in ({"temperature": 0.7, "top_k": 1}, {"temperature": 1.3, "top_p": 1e-6}):
            assert Sampler(SamplingParams(seed=3, **kw, **det))(logits, seen) == torch_next(logits, seen, **kw, **det)
            assert ours == torch_next(logits, seen, **kw, **det)


def test_the_distribution_matches_the_reference():
    """Same support and about the same frequencies as torch's next_token (different random streams)."""
    logits = np.array([2.0, 1.5, 1.4, 0.3, 0.2, -1.0, 2.2, 0.9], np.float32)
    seen = [0, 6]
    kw = {"temperature": 0.8, "top_k": 6, "top_p": 0.9, "repetition_penalty": 1.2}
    p = probs(logits, seen, **kw)
    n = 3000
    ref = np.bincount([torch_next(logits, seen, seed=s, **kw) for s in range(n)], minlength=8) / n
    sampler = Sampler(SamplingParams(seed=0, **kw))
    ours = np.bincount([sampler(logits, seen) for _ in range(n)], minlength=8) / n
    assert set(np.flatnonzero(ref)) == set(np.flatnonzero(p)) == set(np.flatnonzero(ours))
    np.testing.assert_allclose(ours, p, atol=0.03)
    np.testing.assert_allclose(ref, p, atol=0.03)


def test_seeded_sampling_is_reproducible():
    logits = np.random.default_rng(0).normal(size=1000).astype(np.float32)
    draw = lambda seed: [Sampler(SamplingParams(temperature=1.0, seed=seed))(logits, ()) for _ in range(1)]  # noqa
    a = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=7))
    b = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=7))
    c = Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=8))
    sa, sb, sc = ([s(logits, ()) for _ in range(50)] for s in (a, b, c))
    assert sa == sb and sa != sc
    assert draw(5) == draw(5)


@pytest.mark.parametrize("bad", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                 {"repetition_penalty": 0}, {"max_new_tokens": 0}])
def test_bad_parameters_are_refused(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)
