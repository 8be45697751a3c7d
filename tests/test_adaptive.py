"""The early-stop rule of adaptive sampling."""

import numpy as np
import pytest

from pipeline.cli import ConfigError
from pipeline.clique import max_clique
from pipeline.generate.adaptive import (
    CONTINUE,
    EXTRACTED,
    FLAGGED,
    NO_SIGN,
    OUT_OF_REACH,
    UNLIKELY,
    AdaptiveSettings,
    RoundCheck,
    adaptive_outcome,
    adaptive_settings,
    check_round,
    close_pair_matrix,
    close_pairs,
    next_round_end,
    round_ends,
    round_verdict,
)
from pipeline.rule import NearCopyRule

from .conftest import compose_config


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
    assert round_verdict(diverse, settings) == NO_SIGN

    repeated = diverse.copy()
    noise = rng.integers(-5, 6, size=repeated[0].shape)
    repeated[3] = np.clip(repeated[0].astype(int) + noise, 0, 255).astype(np.uint8)  # one near-copy
    assert close_pairs(repeated, settings) == 1
    assert round_verdict(repeated, settings) == CONTINUE
    assert round_verdict(repeated, AdaptiveSettings(first_round=8, min_close_pairs=2)) == NO_SIGN


@pytest.mark.parametrize("bad", [dict(first_round=1), dict(growth=1.0), dict(min_close_pairs=0)])
def test_bad_settings_name_the_key(bad):
    with pytest.raises(ValueError, match="adaptive."):
        AdaptiveSettings(**bad)


def test_outcome_replays_the_rounds_on_existing_samples():
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
    rng = np.random.default_rng(2)
    rule = AdaptiveSettings(first_round=4, growth=2.0, stop_when_flagged=True, rule=NearCopyRule(min_clique=5))
    images = _with_copies(16, 6, rng)  # a clique of 6 among the first 8
    assert round_verdict(images[:4], rule) == "continue"  # 4 copies: not yet a clique of 5
    assert round_verdict(images[:8], rule) == FLAGGED
    # After 4 samples (a clique of 4) one more could complete the clique: the round ends at 5, not 8.
    asked = []
    assert adaptive_outcome(lambda k: asked.append(k) or images[:k], 16, rule) == (5, FLAGGED) and asked == [4, 5]
    # Without the switch the same prompt is sampled to the end.
    plain = AdaptiveSettings(first_round=4, growth=2.0, rule=NearCopyRule(min_clique=5))
    assert adaptive_outcome(lambda k: images[:k], 16, plain) == (16, None)
    # A clique one short of min_clique does not stop it.
    short = _with_copies(16, 4, rng)
    assert adaptive_outcome(lambda k: short[:k], 16, rule) == (16, None)
    with pytest.raises(ValueError, match="rule.min_clique"):
        NearCopyRule(min_clique=1)


def test_rounds_end_where_a_stop_on_the_verdict_could_first_apply():
    both = AdaptiveSettings(
        first_round=8, growth=1.5, stop_when_flagged=True, stop_when_out_of_reach=True, rule=NearCopyRule(min_clique=10)
    )
    assert round_ends(24, both) == [8, 12, 18, 24]
    # (made, largest clique) -> next end, budget 24: the geometric end unless a flag (made + 10 - c)
    # or an out-of-reach stop (24 - 10 + c + 1) could come first.
    # (20, 6): out of reach could apply at 21, but a round is at least ceil(20 / 16) = 2 samples.
    cases = {(8, 3): 12, (12, 4): 18, (18, 5): 20, (13, 9): 14, (20, 6): 22, (12, 8): 14}
    for (made, clique), end in cases.items():
        assert next_round_end(made, RoundCheck(CONTINUE, clique), 24, both) == end, (made, clique)
    # No clique searched (neither stop on): the geometric schedule.
    assert next_round_end(18, RoundCheck(CONTINUE), 24, AdaptiveSettings(first_round=8, growth=1.5)) == 24
    # Only the flag stop: no early end for out of reach.
    flag_only = AdaptiveSettings(first_round=8, growth=1.5, stop_when_flagged=True, rule=NearCopyRule(min_clique=10))
    assert next_round_end(18, RoundCheck(CONTINUE, 5), 24, flag_only) == 23
    # A round is at least MIN_ROUND_SHARE of the samples so far: checks stay cheap at large budgets.
    big = AdaptiveSettings(first_round=16, growth=2.0, stop_when_flagged=True, rule=NearCopyRule(min_clique=10))
    assert next_round_end(320, RoundCheck(CONTINUE, 9), 500, big) == 340


def _clustered(rng, n: int, weights: list[float]) -> np.ndarray:
    """``n`` 16 x 16 samples, each a near-copy of one of ``len(weights)`` modes (drawn with those
    weights) or, with the remaining probability, an image of its own."""
    modes = _diverse(len(weights), rng)[:, :16, :16]
    images = _diverse(n, rng)[:, :16, :16]
    picks = rng.choice(len(weights) + 1, size=n, p=[*weights, 1 - sum(weights)])
    for i, mode in enumerate(picks):
        if mode < len(weights):
            images[i] = np.clip(modes[mode].astype(int) + rng.integers(-5, 6, size=modes[mode].shape), 0, 255)
    return images


@pytest.mark.slow
def test_stops_on_the_verdict_never_change_what_the_detector_flags():
    """A prompt stopped as "flagged" is flagged by the full budget's samples, one stopped as "out of
    reach" is not; the decisions use only the samples made so far (replayed on a full set)."""
    rng = np.random.default_rng(5)
    rule = AdaptiveSettings(
        first_round=4, growth=1.5, stop_when_flagged=True, stop_when_out_of_reach=True, rule=NearCopyRule(min_clique=6)
    )
    seen = {FLAGGED: 0, OUT_OF_REACH: 0, None: 0}
    for _ in range(40):
        n = 16
        weights = list(rng.dirichlet(np.ones(3)) * rng.uniform(0.4, 1.0))
        images = _clustered(rng, n, weights)
        full_clique = max_clique(close_pair_matrix(images, rule)).size
        made, reason = adaptive_outcome(lambda k: images[:k], n, rule)
        if reason == FLAGGED:
            assert full_clique >= rule.min_clique and made < n
        elif reason == OUT_OF_REACH:
            assert full_clique < rule.min_clique and made < n
            # Lossless, and as late as the bound allows: at the stop, clique + remaining < min_clique.
            assert check_round(images[:made], rule, n).clique_size + (n - made) < rule.min_clique
        if reason in seen:
            seen[reason] += 1
    assert all(seen.values()), seen  # every outcome occurred, so the assertions above were exercised
    # Without the budget, the out-of-reach stop cannot decide.
    assert round_verdict(_clustered(rng, 12, [0.2]), rule) in (CONTINUE, NO_SIGN)


def test_settings_from_config_name_unknown_keys():
    from pipeline.generate.adaptive import adaptive_settings

    assert adaptive_settings(None) == AdaptiveSettings()
    rule = NearCopyRule(threshold=0.1, min_clique=12)
    got = adaptive_settings({"enabled": True, "first_round": "8", "stop_when_flagged": True}, rule)
    assert got == AdaptiveSettings(enabled=True, first_round=8, stop_when_flagged=True, rule=rule)
    with pytest.raises(ValueError, match="adaptive.first_rounds: unknown key"):
        adaptive_settings({"first_rounds": 8})
    # The near-copy rule moved out of the adaptive section: one rule for every stage.
    for key, where in (("threshold", "rule.threshold"), ("min_clique", "rule.min_clique"), ("grid", "metric.grid")):
        with pytest.raises(ValueError, match=rf"^adaptive\.{key}: moved: .* set {where}"):
            adaptive_settings({key: 1})


def test_unreadable_samples_are_left_out_of_the_checks(tmp_path):
    """As the detector skips a sample that does not decode, so do the round checks (they used to
    raise): the others decide, and the budget left still counts from the samples made."""
    from PIL import Image

    from pipeline.data.rejects import RejectLog
    from pipeline.generate import read_samples
    from pipeline.generations import sample_path

    rng = np.random.default_rng(7)
    images = _with_copies(6, 3, rng)  # a clique of 3 among the first 3
    for i, image in enumerate(images):
        path = sample_path(tmp_path, "p", i)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(path)
    sample_path(tmp_path, "p", 4).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    rejects = RejectLog()
    read = read_samples(tmp_path, "p", 6, rejects)
    assert len(read) == 5 and len(rejects) == 1 and rejects.entries[0]["key"] == "p/00004.png"
    np.testing.assert_array_equal(read, images[[0, 1, 2, 3, 5]])
    rule = AdaptiveSettings(first_round=6, stop_when_flagged=True, stop_when_out_of_reach=True, rule=NearCopyRule(min_clique=5))
    # Clique 3 among the 5 read; 6 made of a budget of 7: 3 + 1 < 5, out of reach. Counting
    # from the 5 read (2 left) would wrongly keep it going.
    assert check_round(read, rule, 7, made=6) == RoundCheck(OUT_OF_REACH, 3)
    assert check_round(read, rule, 7).verdict == CONTINUE
    assert adaptive_outcome(lambda k: read_samples(tmp_path, "p", k), 7, rule) == (6, OUT_OF_REACH)
    flag = AdaptiveSettings(first_round=6, stop_when_flagged=True, rule=NearCopyRule(min_clique=3))
    assert adaptive_outcome(lambda k: read_samples(tmp_path, "p", k), 7, flag) == (6, FLAGGED)


def test_unlikely_bound_on_known_numbers():
    """c + r * (upper end of the 95% Wilson interval of c in m), written out: 2 of 8 samples in
    the clique, 16 left: p+ = 0.5907 and the bound 11.452 (go on, for a clique of 10); 3 of 12
    with 12 left: 9.388 (stop); 3 of 11 with 13 left: 10.353 (go on). The three decimals are
    rounded, hence the tolerance of half a unit in the last."""
    from pipeline.generate.adaptive import clique_growth_bound, unlikely_to_complete
    from pipeline.stats import Z_95

    def by_hand(c, m, r):
        p, z2 = c / m, Z_95**2
        centre = (p + z2 / (2 * m)) / (1 + z2 / m)
        half = Z_95 / (1 + z2 / m) * np.sqrt(p * (1 - p) / m + z2 / (4 * m * m))
        return c + r * (centre + half)

    for c, m, r in ((2, 8, 16), (3, 12, 12), (3, 11, 13), (9, 9, 0)):
        assert clique_growth_bound(c, m, r) == pytest.approx(by_hand(c, m, r), rel=1e-12)
    assert clique_growth_bound(2, 8, 16) == pytest.approx(11.452, abs=5e-4)
    assert not unlikely_to_complete(2, 8, 16, 10)
    assert unlikely_to_complete(3, 12, 12, 10) and clique_growth_bound(3, 12, 12) == pytest.approx(9.388, abs=5e-4)
    assert not unlikely_to_complete(3, 11, 13, 10) and clique_growth_bound(3, 11, 13) == pytest.approx(10.353, abs=5e-4)
    # Every sample in the clique: p+ = 1, the bound is c + r, out_of_reach's (a proof) exactly.
    assert clique_growth_bound(5, 5, 4) == 9 and unlikely_to_complete(5, 5, 4, 10)


def test_stop_when_unlikely_stops_a_clique_that_does_not_grow():
    """Two repeated samples among diverse ones: a clique of 2. After 8 of 24 samples the bound is
    11.452 (go on; the round ends at 10, the first count where an unchanged clique of 2 falls
    short: 9.138, while at 9 it is 10.211); the replay stops there; after 12 it is 7.376: stop
    too. Without the stop the prompt goes on (out of reach comes only at 16 samples)."""
    rng = np.random.default_rng(3)
    images = _diverse(24, rng)
    images[1] = images[0]
    settings = AdaptiveSettings(first_round=8, growth=1.5, stop_when_unlikely=True)
    check = check_round(images[:8], settings, 24)
    assert check == RoundCheck(CONTINUE, 2)
    assert next_round_end(8, check, 24, settings) == 10
    assert check_round(images[:12], settings, 24).verdict == UNLIKELY
    assert adaptive_outcome(lambda k: images[:k], 24, settings) == (10, UNLIKELY)
    assert (
        check_round(images[:12], AdaptiveSettings(first_round=8, growth=1.5, stop_when_out_of_reach=True), 24).verdict == CONTINUE
    )


def test_group_matcher_compares_samples_with_the_groups_training_images(tmp_path):
    """A sample that is one of the group's images (fitted to the sample size) matches; another
    group's image, or none found, does not; each key is fetched once."""
    from PIL import Image

    from pipeline.metrics import TiledL2
    from pipeline.training_images import GroupMatcher, fit_to

    rng = np.random.default_rng(0)
    pictures = {key: rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8) for key in ("a", "b")}
    for key, array in pictures.items():
        Image.fromarray(array).save(tmp_path / f"{key}.png")
    matcher = GroupMatcher({"format": "files", "path": str(tmp_path)}, TiledL2(), threshold=0.15)
    sample = np.asarray(fit_to(Image.fromarray(pictures["a"]), (32, 32)))[None]
    assert matcher.any_match(sample, ["a"]) and not matcher.any_match(sample, ["b"])
    assert not matcher.any_match(sample, ["missing"]) and not matcher.any_match(sample[:0], ["a"])
    assert set(matcher._images) == {"a", "b", "missing"} and matcher._images["missing"] is None
    assert [e["key"] for e in matcher.rejects.entries] == ["missing"]


def test_group_matcher_keeps_at_most_max_bytes_and_forgets(tmp_path):
    """With ``max_bytes`` the least recently compared images are dropped past it (never those of
    the call at hand, so a group larger than the budget still compares), read again when next
    asked for, with the same answers; :meth:`forget` drops a group's images."""
    from PIL import Image

    from pipeline.metrics import TiledL2
    from pipeline.training_images import GroupMatcher, fit_to

    rng = np.random.default_rng(1)
    pictures = {key: rng.integers(0, 256, size=(48, 40, 3), dtype=np.uint8) for key in ("a", "b", "c")}
    for key, array in pictures.items():
        Image.fromarray(array).save(tmp_path / f"{key}.png")
    one = 48 * 40 * 3  # decoded RGB bytes of one image
    samples = {key: np.asarray(fit_to(Image.fromarray(array), (32, 32)))[None] for key, array in pictures.items()}
    matcher = GroupMatcher({"format": "files", "path": str(tmp_path)}, TiledL2(), threshold=0.15, max_bytes=2 * one)
    for key in ("a", "b", "c"):
        assert matcher.any_match(samples[key], [key])
        assert matcher.bytes_kept <= 2 * one
    assert list(matcher._images) == ["b", "c"]  # "a", the least recently compared, went first
    assert matcher.any_match(samples["a"], ["a"]) and not matcher.any_match(samples["a"], ["b"])
    assert list(matcher._images) == ["a", "b"]
    tight = GroupMatcher({"format": "files", "path": str(tmp_path)}, TiledL2(), threshold=0.15, max_bytes=0)
    assert tight.any_match(samples["c"], ["a", "b", "c"]) and tight.bytes_kept == 3 * one
    assert tight.any_match(samples["a"], ["a"]) and list(tight._images) == ["a"]
    matcher.forget(["a", "b", "never-fetched"])
    assert not matcher._images and matcher.bytes_kept == 0
    with pytest.raises(ValueError, match="max_bytes"):
        GroupMatcher({"format": "files", "path": str(tmp_path)}, TiledL2(), threshold=0.15, max_bytes=-1)


def test_training_cache_mb_must_be_a_size(tmp_path):
    from pipeline.cli import ConfigError
    from pipeline.generate import run as run_stage

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    overrides = [f"run_dir={tmp_path}", f"prompts={prompts}", "adaptive.enabled=true", "adaptive.stop_when_extracted=true"]
    cfg = compose_config("generate", [*overrides, f"+data.path={tmp_path}", "+data.format=files", "training_cache_mb=-5"])
    with pytest.raises(ConfigError, match=r"^training_cache_mb: must be at least 0, got -5\.0$"):
        run_stage(cfg)


def test_stop_when_extracted_without_a_training_set_is_a_config_error(tmp_path):
    from pipeline.cli import ConfigError
    from pipeline.generate import run as run_stage

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    cfg = compose_config(
        "generate", [f"run_dir={tmp_path}", f"prompts={prompts}", "adaptive.enabled=true", "adaptive.stop_when_extracted=true"]
    )
    with pytest.raises(ConfigError, match=r"^adaptive.stop_when_extracted: .*data="):
        run_stage(cfg)
    assert adaptive_settings({"stop_when_unlikely": True, "stop_when_extracted": True}).stop_when_unlikely


def test_near_training_holds_a_prompt_past_the_stops_on_the_flag_until_a_match():
    """Diverse samples (no near-copy pair) stop after the first round unless a sample so far is
    within near_training of a training image: then the prompt is held, on the geometric
    schedule, until the first round holding a match (sample 13) stops it as extracted, or to the
    budget with no match. ``near`` is asked only where a stop would apply."""
    rng = np.random.default_rng(5)
    images = _diverse(40, rng)
    settings = AdaptiveSettings(
        first_round=4,
        growth=2.0,
        stop_when_extracted=True,
        stop_when_out_of_reach=True,
        stop_when_unlikely=True,
        stop_when_flagged=True,
        near_training=0.25,
    )
    asked_first, asked_near = [], []

    def first(k):
        asked_first.append(k)
        return images[:k]

    def near(end, first_near=5):
        asked_near.append(end)
        return end > first_near

    def matches(start, end, first_match=13):
        return end > first_match

    # The first near sample is index 5, after the first round (4 samples): the stop stands.
    assert adaptive_outcome(first, 40, settings, None, near) == (4, NO_SIGN) and asked_near == [4]
    # Sample 2 is near: held through every round.
    asked_first.clear(), asked_near.clear()
    assert adaptive_outcome(first, 40, settings, None, lambda end: near(end, first_near=2)) == (40, None)
    assert asked_first == round_ends(40, settings)[:-1]  # held rounds follow the schedule: 4, 8, 16, 32
    assert asked_near == asked_first  # asked at every would-be stop (each round here has no near-copy pair)
    assert adaptive_outcome(first, 40, settings, matches, lambda end: near(end, first_near=2)) == (16, EXTRACTED)
    # Off (None), or no near check given: the stop stands.
    plain = AdaptiveSettings(first_round=4, growth=2.0, stop_when_extracted=True)
    assert adaptive_outcome(first, 40, plain, matches, lambda end: True) == (4, NO_SIGN)
    assert adaptive_outcome(first, 40, settings, matches, None) == (4, NO_SIGN)


def test_a_first_round_of_one_sample_needs_near_training_and_is_held_by_it():
    """One sample has no pair: a first round of 1 is refused unless near_training can hold the
    prompt. With it, a first sample near a training image holds the prompt on to the match (or the
    budget); a first sample that is not near stops it there, as no near-copy pair would."""
    with pytest.raises(ValueError, match="adaptive.first_round: .*near_training"):
        AdaptiveSettings(first_round=1, growth=1.5, stop_when_extracted=True)
    settings = AdaptiveSettings(first_round=1, growth=1.5, stop_when_extracted=True, near_training=0.25)
    assert round_ends(8, settings) == [1, 2, 3, 5, 8]
    images = _diverse(8, np.random.default_rng(6))

    def first(k):
        return images[:k]

    assert adaptive_outcome(first, 8, settings, lambda start, end: False, lambda end: False) == (1, NO_SIGN)
    assert adaptive_outcome(first, 8, settings, lambda start, end: end >= 3, lambda end: True) == (3, EXTRACTED)
    assert adaptive_outcome(first, 8, settings, lambda start, end: start == 0, lambda end: True) == (1, EXTRACTED)
    assert adaptive_outcome(first, 8, settings, lambda start, end: False, lambda end: True) == (8, None)


def test_near_training_never_overrides_the_flag():
    rng = np.random.default_rng(6)
    rule = AdaptiveSettings(
        first_round=4,
        growth=2.0,
        stop_when_flagged=True,
        stop_when_extracted=True,
        near_training=0.25,
        rule=NearCopyRule(min_clique=5),
    )
    images = _with_copies(16, 6, rng)
    plain = AdaptiveSettings(first_round=4, growth=2.0, stop_when_flagged=True, rule=NearCopyRule(min_clique=5))
    assert adaptive_outcome(lambda k: images[:k], 16, rule, None, lambda end: True) == adaptive_outcome(
        lambda k: images[:k], 16, plain
    )
    assert adaptive_outcome(lambda k: images[:k], 16, rule, None, lambda end: True)[1] == FLAGGED


def test_near_training_settings_name_the_key():
    got = adaptive_settings({"near_training": "0.25", "stop_when_extracted": True})
    assert got.near_training == 0.25 and got.describe()["near_training"] == 0.25
    assert adaptive_settings({"near_training": None}).near_training is None
    with pytest.raises(ValueError, match="adaptive.near_training: .*stop_when_extracted"):
        adaptive_settings({"near_training": 0.25})
    for bad in (0, -0.1):
        with pytest.raises(ValueError, match="adaptive.near_training: must be a positive"):
            adaptive_settings({"near_training": bad, "stop_when_extracted": True})
    with pytest.raises(ConfigError, match="adaptive.near_training"):
        adaptive_settings({"near_training": "far", "stop_when_extracted": True})
