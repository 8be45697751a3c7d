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

    assert adaptive_outcome(first, 10, settings) == (4, "no_close_pairs") and asked == [4]
    repeated = diverse.copy()
    repeated[1] = repeated[0]  # a near-copy pair in the first round: sample to the end
    asked.clear()
    assert adaptive_outcome(lambda k: first(k, repeated), 10, settings) == (10, None) and asked == [4, 8]
    assert adaptive_outcome(first, 3, settings) == (3, None)  # a budget below one round: no decision


def _with_copies(n: int, copies: int, rng) -> np.ndarray:
    """``n`` random images of which the first ``copies`` are near-copies of one image."""
    images = _diverse(n, rng)
    for i in range(1, copies):
        noise = rng.integers(-5, 6, size=images[0].shape)
        images[i] = np.clip(images[0].astype(int) + noise, 0, 255).astype(np.uint8)
    return images


def test_stop_when_flagged_ends_a_prompt_once_its_clique_is_complete():
    from pipeline.adaptive import FLAGGED, adaptive_outcome, round_verdict

    rng = np.random.default_rng(2)
    rule = AdaptiveSettings(first_round=4, growth=2.0, stop_when_flagged=True, min_clique=5)
    images = _with_copies(16, 6, rng)  # a clique of 6 among the first 8
    assert round_verdict(images[:4], rule) == "continue"  # 4 copies: not yet a clique of 5
    assert round_verdict(images[:8], rule) == FLAGGED
    assert adaptive_outcome(lambda k: images[:k], 16, rule) == (8, FLAGGED)
    # Without the switch the same prompt is sampled to the end.
    plain = AdaptiveSettings(first_round=4, growth=2.0, min_clique=5)
    assert adaptive_outcome(lambda k: images[:k], 16, plain) == (16, None)
    # A clique one short of min_clique does not stop it.
    short = _with_copies(16, 4, rng)
    assert adaptive_outcome(lambda k: short[:k], 16, rule) == (16, None)
    with pytest.raises(ValueError, match="adaptive.min_clique"):
        AdaptiveSettings(min_clique=1)


def test_settings_from_config_name_unknown_keys():
    from pipeline.adaptive import adaptive_settings

    assert adaptive_settings(None) == AdaptiveSettings()
    got = adaptive_settings({"enabled": True, "first_round": "8", "threshold": 0.1, "stop_when_flagged": True, "min_clique": 12})
    assert got == AdaptiveSettings(enabled=True, first_round=8, threshold=0.1, stop_when_flagged=True, min_clique=12)
    with pytest.raises(ValueError, match="adaptive.first_rounds: unknown key"):
        adaptive_settings({"first_rounds": 8})
