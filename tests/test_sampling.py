from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from fastslm.runtime.errors import OptionError
from fastslm.runtime.sampling import Sampler, SamplingOptions


def hf_kept(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> set[int]:
    """The token set transformers' generate(do_sample=True) can draw from, in its order."""
    scores = torch.from_numpy(logits.astype(np.float32))[None]
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return set(torch.nonzero(torch.isfinite(scores[0])).flatten().tolist())


def test_defaults_and_reference():
    opts = SamplingOptions()
    assert (opts.temperature, opts.top_k, opts.top_p, opts.seed, opts.max_new_tokens) == (0.0, 20, 0.95, None, 512)
    assert opts.greedy
    ref = SamplingOptions.reference()
    assert (ref.temperature, ref.top_k, ref.top_p, ref.max_new_tokens) == (0.2, 20, 0.95, 512)
    assert not ref.greedy
    assert SamplingOptions.reference(seed=3).seed == 3


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64])
def test_greedy_is_argmax(dtype):
    rng = np.random.default_rng(0)
    sampler = Sampler(SamplingOptions())
    for _ in range(20):
        logits = rng.normal(size=1000).astype(dtype)
        assert sampler(logits) == int(np.argmax(logits))
    with pytest.raises(ValueError, match="NaN"):
        sampler(np.array([0.0, np.nan], dtype=dtype))


@pytest.mark.parametrize(
    "temperature, top_k, top_p",
    [(0.2, 20, 0.95), (1.0, 20, 0.95), (0.7, 0, 0.9), (1.5, 50, 1.0), (1.0, 5, 0.5), (2.0, 0, 0.99), (0.5, 1, 0.95),
     (1.0, 0, 0.05)],
)
def test_kept_set_matches_transformers(temperature, top_k, top_p):
    rng = np.random.default_rng(42)
    sampler = Sampler(SamplingOptions(temperature=temperature, top_k=top_k, top_p=top_p, seed=0))
    for scale in (0.5, 2.0, 5.0):
        for _ in range(10):
            logits = (rng.normal(size=2000) * scale).astype(np.float32)
            ids, _ = sampler.candidates(logits)
            assert set(ids.tolist()) == hf_kept(logits, temperature, top_k, top_p)


def test_kept_set_with_ties_and_masked_tokens():
    logits = np.array([3.0, 3.0, 3.0, 1.0, -np.inf, 0.5, 3.0], dtype=np.float32)
    sampler = Sampler(SamplingOptions(temperature=1.0, top_k=2, top_p=1.0))
    ids, _ = sampler.candidates(logits)
    assert set(ids.tolist()) == hf_kept(logits, 1.0, 2, 1.0) == {0, 1, 2, 6}  # ties with the k-th stay
    ids, _ = Sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=1.0)).candidates(logits)
    assert 4 not in ids.tolist()


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_frequencies_match_filtered_softmax(dtype):
    rng = np.random.default_rng(7)
    logits = (rng.normal(size=50) * 2).astype(dtype)
    opts = SamplingOptions(temperature=0.8, top_k=10, top_p=0.9, seed=123)
    sampler = Sampler(opts)
    kept = sorted(hf_kept(logits.astype(np.float32), 0.8, 10, 0.9))
    scaled = logits.astype(np.float64)[kept] / 0.8
    expected = np.zeros(logits.size)
    expected[kept] = np.exp(scaled - scaled.max()) / np.exp(scaled - scaled.max()).sum()
    draws = np.array([sampler(logits) for _ in range(20_000)])
    freq = np.bincount(draws, minlength=logits.size) / draws.size
    assert set(np.flatnonzero(freq)) <= set(kept)
    np.testing.assert_allclose(freq, expected, atol=0.01)


def test_same_seed_same_sequence():
    rng = np.random.default_rng(1)
    rows = rng.normal(size=(64, 300)).astype(np.float32)
    opts = SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, seed=99)
    a, b = Sampler(opts), Sampler(opts)
    seq_a = [a(row) for row in rows]
    assert seq_a == [b(row) for row in rows]
    c = Sampler(SamplingOptions(temperature=1.0, top_k=0, top_p=1.0, seed=100))
    assert seq_a != [c(row) for row in rows]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "hot"}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"seed": -3}, "seed"),
    ],
)
def test_option_validation(kwargs, match):
    with pytest.raises(OptionError, match=match) as info:
        SamplingOptions(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_logits():
    sampler = Sampler(SamplingOptions.reference(seed=0))
    with pytest.raises(ValueError):
        sampler(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="-inf"):
        sampler(np.full(5, -np.inf))


def test_a_model_config_recommends_its_decoding():
    from fastslm.runtime.errors import ModelFileError

    assert SamplingOptions.from_config({"format": "fastslm-model"}, "c") == SamplingOptions()  # none: greedy
    assert SamplingOptions.from_config({"decoding": {"beam_size": 4}}, "c") == SamplingOptions(beam_size=4)
    for decoding, match in [([4], "must be an object"), ({"beams": 4}, "unknown option.*beams"),
                            ({"seed": 1}, "unknown option.*seed"), ({"beam_size": 0}, "beam_size 0"),
                            ({"beam_size": 4, "temperature": 0.5}, "temperature 0")]:  # fmt: skip
        with pytest.raises(ModelFileError, match=match):
            SamplingOptions.from_config({"decoding": decoding}, "config.json")


@pytest.mark.parametrize("given, expected", [
    ({}, dict(beam_size=4)),
    ({"beam_size": None, "top_k": None}, dict(beam_size=4)),  # None: not given
    ({"beam_size": 1}, dict(beam_size=1)),
    ({"temperature": 0.5}, dict(temperature=0.5, beam_size=1)),  # sampling asked alone drops the beams
    ({"temperature": 0.0}, dict(beam_size=4)),
    ({"max_new_tokens": 7, "seed": 3}, dict(beam_size=4, max_new_tokens=7, seed=3)),
])
def test_given_options_replace_only_themselves(given, expected):
    assert SamplingOptions(beam_size=4).replaced(**given) == SamplingOptions(**expected)
    assert SamplingOptions(temperature=0.2).replaced(beam_size=3) == SamplingOptions(beam_size=3)  # and beams the temperature


def test_replaced_options_are_checked():
    with pytest.raises(OptionError, match="temperature 0"):
        SamplingOptions(beam_size=4).replaced(temperature=0.5, beam_size=2)
    with pytest.raises(OptionError, match="top_p"):
        SamplingOptions().replaced(top_p=0)
