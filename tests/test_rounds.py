"""The generator's round scheduler, without files or a model: a dict stands for the folder."""

import numpy as np

from pipeline.generate.adaptive import FLAGGED, NO_SIGN, AdaptiveSettings, adaptive_outcome
from pipeline.generate.rounds import RoundScheduler


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
