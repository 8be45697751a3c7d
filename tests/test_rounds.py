"""The generator's round scheduler, without files or a model: a dict stands for the folder."""

import numpy as np

from pipeline.generate.adaptive import FLAGGED, NO_SIGN, AdaptiveSettings, adaptive_outcome
from pipeline.generate.rounds import RoundScheduler
from pipeline.generations import EXTRACTED
from pipeline.rule import NearCopyRule


class FakeFolder:
    """Samples "on disk" per prompt: ``images[prompt][i]`` once written."""

    def __init__(self, make):
        self.make = make  # make(prompt_id, index) -> uint8 image
        self.images: dict[str, dict[int, np.ndarray]] = {}
        self.finished: list[tuple[str, int, str | None]] = []

    def missing(self, prompt_id, start, end):
        return [i for i in range(start, end) if i not in self.images.get(prompt_id, {})]

    def read(self, prompt_id, count):
        return np.stack([self.images[prompt_id][i] for i in range(count)])

    def on_finish(self, prompt_id, made, reason):
        self.finished.append((prompt_id, made, reason))

    def write(self, task):
        self.images.setdefault(task.prompt_id, {})[task.index] = self.make(task.prompt_id, task.index)


def run_all(scheduler, folder, prompts, n_samples):
    """Drive the scheduler as the generator's loop does: queue, write, report each write."""
    queue = []
    for prompt_id in prompts:
        queue += scheduler.start(prompt_id, f"caption {prompt_id}", list(range(100, 100 + n_samples)))
    made = 0
    while queue:
        task = queue.pop(0)
        assert task.seed == 100 + task.index  # each sample keeps its own seed
        folder.write(task)
        made += 1
        queue += scheduler.written(task.prompt_id)
    return made


def repeated(prompt_id, index):
    return np.full((16, 16, 3), 7, dtype=np.uint8)


def diverse(prompt_id, index):
    return np.random.default_rng([index, len(prompt_id)]).integers(0, 256, (16, 16, 3), dtype=np.uint8)


def test_without_adaptive_sampling_every_prompt_gets_its_budget_in_one_round():
    folder = FakeFolder(diverse)
    scheduler = RoundScheduler(5, None, missing=folder.missing, read=folder.read, on_finish=folder.on_finish)
    assert run_all(scheduler, folder, ["a", "b"], 5) == 10
    assert sorted(folder.finished) == [("a", 5, None), ("b", 5, None)]
    assert scheduler.active == 0


def test_samples_on_disk_are_not_made_again_and_a_complete_prompt_finishes_at_once():
    folder = FakeFolder(diverse)
    folder.images["a"] = {i: diverse("a", i) for i in range(5)}
    folder.images["b"] = {0: diverse("b", 0)}
    scheduler = RoundScheduler(5, None, missing=folder.missing, read=folder.read, on_finish=folder.on_finish)
    assert scheduler.start("a", "x", range(5)) == []
    assert folder.finished == [("a", 5, None)]
    assert [t.index for t in scheduler.start("b", "y", range(5))] == [1, 2, 3, 4]


def test_adaptive_rounds_decide_as_the_replay_of_a_full_run_does():
    """The scheduler's stops are adaptive_outcome's on the same samples (the budget report's
    replay of a brute-force run), for a prompt that never repeats and one that always does."""
    settings = AdaptiveSettings(enabled=True, first_round=4, growth=2.0, stop_when_flagged=True)
    n_samples = 40
    outcomes = {}
    for make, prompt_id in ((diverse, "div"), (repeated, "rep")):
        folder = FakeFolder(make)
        scheduler = RoundScheduler(n_samples, settings, missing=folder.missing, read=folder.read, on_finish=folder.on_finish)
        made = run_all(scheduler, folder, [prompt_id], n_samples)
        full = np.stack([make(prompt_id, i) for i in range(n_samples)])
        expected = adaptive_outcome(lambda k: full[:k], n_samples, settings)
        assert folder.finished == [(prompt_id, *expected)]
        assert made == expected[0]
        outcomes[prompt_id] = expected
    # Both paths are exercised: the diverse prompt stops after its first round, the repeated
    # one once its clique of min_clique (10) exists, before the budget.
    assert outcomes["div"] == (4, NO_SIGN)
    assert outcomes["rep"][1] == FLAGGED and outcomes["rep"][0] < n_samples


def matching_folder(first_match: int | None):
    """A prompt whose samples are near-copies of each other from sample 2 on (so that only the
    extraction stop or a flag can end it), and whose sample ``first_match`` (and every later one)
    reproduces a training image; records the ranges asked about."""
    asked: list[tuple[int, int]] = []

    def make(prompt_id, index):
        return repeated(prompt_id, index) if index >= 2 else diverse(prompt_id, index)

    def matches(prompt_id, start, end):
        asked.append((start, end))
        return first_match is not None and end > first_match

    return FakeFolder(make), matches, asked


def test_stop_when_extracted_stops_at_the_first_round_holding_a_match_as_the_replay_does():
    """The first round ends at 4 samples (a clique of 2: samples 2 and 3), the next at 7, where a
    clique of 5 could first be complete (4 + 5 - 2). A match at sample 5 stops the prompt after
    the round that made it (7 samples), checked before the flag that the same round gives; the
    replay on the full run's samples decides the same, and each round's samples are asked about
    once."""
    settings = AdaptiveSettings(
        enabled=True, first_round=4, growth=2.0, stop_when_flagged=True, stop_when_extracted=True, rule=NearCopyRule(min_clique=5)
    )
    n_samples = 32
    for first_match, expected in ((5, (7, EXTRACTED)), (0, (4, EXTRACTED)), (None, None)):
        folder, matches, asked = matching_folder(first_match)
        scheduler = RoundScheduler(
            n_samples, settings, missing=folder.missing, read=folder.read, on_finish=folder.on_finish, matches=matches
        )
        made = run_all(scheduler, folder, ["p"], n_samples)
        full = np.stack([folder.make("p", i) for i in range(n_samples)])
        replay_asked: list[tuple[int, int]] = []

        def replay_matches(start, end, first_match=first_match):
            replay_asked.append((start, end))
            return first_match is not None and end > first_match

        replayed = adaptive_outcome(lambda k: full[:k], n_samples, settings, replay_matches)
        assert folder.finished == [("p", *replayed)] and made == replayed[0]
        assert asked == replay_asked and all(a[1] == b[0] for a, b in zip(asked, asked[1:])) and asked[0][0] == 0
        if expected is not None:
            assert replayed == expected
            # Never later than brute force finds the match: the first round end past it.
            assert replayed[0] > first_match and not any(first_match < end < replayed[0] for _, end in asked)
        else:
            assert replayed[1] == FLAGGED  # no match: the clique of 5 (samples 2-6) stops it


def test_without_a_match_check_stop_when_extracted_changes_nothing():
    settings = AdaptiveSettings(enabled=True, first_round=4, growth=2.0, stop_when_flagged=True, stop_when_extracted=True)
    folder = FakeFolder(repeated)
    scheduler = RoundScheduler(40, settings, missing=folder.missing, read=folder.read, on_finish=folder.on_finish)
    run_all(scheduler, folder, ["r"], 40)
    full = np.stack([repeated("r", i) for i in range(40)])
    assert folder.finished == [("r", *adaptive_outcome(lambda k: full[:k], 40, settings))]
    assert folder.finished[0][2] == FLAGGED


def test_near_training_holds_a_prompt_in_the_scheduler_as_in_the_replay():
    """A prompt whose samples never repeat: stopped after its first round, unless ``near`` says
    a sample so far came within near_training of a training image (from sample 3 on); then held
    to its first match (sample 9: stopped at the round end 16) or to the budget. The scheduler
    and adaptive_outcome (the budget report's replay) decide alike."""
    settings = AdaptiveSettings(
        enabled=True, first_round=4, growth=2.0, stop_when_flagged=True, stop_when_extracted=True, near_training=0.25
    )
    n_samples = 40
    full = np.stack([diverse("p", i) for i in range(n_samples)])
    for first_near, first_match, expected in ((3, 9, (16, EXTRACTED)), (3, None, (n_samples, None)), (None, 9, (4, NO_SIGN))):

        def near(end, first_near=first_near):
            return first_near is not None and end > first_near

        def matches(start, end, first_match=first_match):
            return first_match is not None and start <= first_match < end

        folder = FakeFolder(diverse)
        scheduler = RoundScheduler(
            n_samples,
            settings,
            missing=folder.missing,
            read=folder.read,
            on_finish=folder.on_finish,
            matches=lambda pid, start, end: matches(start, end),
            near=lambda pid, end: near(end),
        )
        made = run_all(scheduler, folder, ["p"], n_samples)
        replayed = adaptive_outcome(lambda k: full[:k], n_samples, settings, matches, near)
        assert replayed == expected and folder.finished == [("p", *expected)] and made == expected[0]
