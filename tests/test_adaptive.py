"""The early-stop rule of adaptive sampling."""

import numpy as np
import pytest

from pipeline.adaptive import AdaptiveSettings, close_pairs, keep_sampling, round_ends


def _diverse(n: int, rng) -> np.ndarray:
    return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)


def test_rounds_grow_to_the_full_budget():
    settings = AdaptiveSettings(first_round=16, growth=2.0)
    assert round_ends(500, settings) == [16, 32, 64, 128, 256, 500]
    assert round_ends(10, settings) == [10]
    assert round_ends(16, settings) == [16]


def test_diverse_samples_stop_early_and_repeats_continue():
    rng = np.random.default_rng(0)
    settings = AdaptiveSettings(first_round=8)
    diverse = _diverse(8, rng)
    assert close_pairs(diverse, settings) == 0
    assert not keep_sampling(diverse, settings)

    repeated = diverse.copy()
    noise = rng.integers(-5, 6, size=repeated[0].shape)
    repeated[3] = np.clip(repeated[0].astype(int) + noise, 0, 255).astype(np.uint8)  # one near-copy
    assert close_pairs(repeated, settings) == 1
    assert keep_sampling(repeated, settings)
    assert not keep_sampling(repeated, AdaptiveSettings(first_round=8, min_close_pairs=2))


@pytest.mark.parametrize("bad", [dict(first_round=1), dict(growth=1.0), dict(min_close_pairs=0)])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(ValueError, match="adaptive."):
        AdaptiveSettings(**bad)
