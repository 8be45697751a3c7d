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


def test_outcome_replays_the_rounds_on_existing_samples():
    from pipeline.adaptive import adaptive_outcome

    rng = np.random.default_rng(1)
    settings = AdaptiveSettings(first_round=4, growth=2.0)
    diverse = _diverse(10, rng)
    asked = []

    def first(k, images=diverse):
        asked.append(k)
        return images[:k]

    assert adaptive_outcome(first, 10, settings) == (4, True) and asked == [4]
    repeated = diverse.copy()
    repeated[1] = repeated[0]  # a near-copy pair in the first round: sample to the end
    asked.clear()
    assert adaptive_outcome(lambda k: first(k, repeated), 10, settings) == (10, False) and asked == [4, 8]
    assert adaptive_outcome(first, 3, settings) == (3, False)  # a budget below one round: no decision


def test_settings_from_config_name_unknown_keys():
    from pipeline.adaptive import adaptive_settings

    assert adaptive_settings(None) == AdaptiveSettings()
    got = adaptive_settings({"enabled": True, "first_round": "8", "threshold": 0.1})
    assert got == AdaptiveSettings(enabled=True, first_round=8, threshold=0.1)
    with pytest.raises(ValueError, match="adaptive.first_rounds: unknown key"):
        adaptive_settings({"first_rounds": 8})
