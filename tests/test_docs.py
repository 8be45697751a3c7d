"""The documentation a user reads: the README's commands compose with the real configs, its
links resolve, it stays short, and no tracked text speaks of how the project was developed."""

from __future__ import annotations

import importlib.util
import re
import shlex
import subprocess
from pathlib import Path

import pytest

from .conftest import REPO, compose_config

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
STAGES = ("dedup", "prescreen", "generate", "detect", "report")

# Words about how the project was developed rather than what it does (working periods, tracker numbers).
# Spelled in pieces so that this file does not match itself.
PROCESS_WORDS = re.compile(r"\bsess" + r"ions?\b|\biss" + r"ue\s*#?\s*\d+|\biss" + r"ue's\b", re.IGNORECASE)
# pytest's own sense of the word stays: a fixture shared by the whole test run.
PYTEST_SCOPE = re.compile(r"""scope\s*=\s*["']sess""" + r"""ion["']""")
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".cfg", ".txt", ".j2", ".ipynb"}
TEXT_NAMES = {"Makefile", "run"}  # run: .ci/run
# The shipped demo model's files are data, not prose: its tokenizer's vocabulary holds these words.
DATA_FOLDERS = ("models/",)


def tracked_text_files() -> list[Path]:
    """The repository's tracked files (its working tree when git is not available) that hold prose."""
    try:
        names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        names = [
            str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".venv" not in p.parts and ".git" not in p.parts
        ]
    files = []
    for name in filter(None, names):
        path = REPO / name
        if name.startswith(DATA_FOLDERS) or not path.is_file():
            continue
        if path.suffix in TEXT_SUFFIXES or path.name in TEXT_NAMES:
            files.append(path)
    return files


def test_no_development_process_words():
    files = tracked_text_files()
    assert README in files and len(files) > 50  # the scan sees the project, not an empty list
    found = []
    for path in files:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if PROCESS_WORDS.search(PYTEST_SCOPE.sub("", line)):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "development-process words (state contracts, not history):\n" + "\n".join(found)


def test_the_word_check_catches_what_it_should():
    assert PROCESS_WORDS.search("measured in the last sess" + "ion")
    assert PROCESS_WORDS.search("iss" + "ue 17's check")
    assert PROCESS_WORDS.search("the iss" + "ue's target (#17)")
    assert not PROCESS_WORDS.search(PYTEST_SCOPE.sub("", '@pytest.fixture(scope="sess' + 'ion")'))


def fenced_blocks(text: str) -> list[str]:
    """The bodies of a Markdown file's fenced code blocks."""
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)


def stage_commands(path: Path) -> list[tuple[str, list[str]]]:
    """Every ``python -m pipeline.<module> ...`` line in ``path``'s code blocks, continuation lines
    joined and comments dropped, as ``(command, words)``. A ``$var`` of a ``for var in ...; do``
    loop in the same block gives one command per value of the loop."""
    commands = []
    for block in fenced_blocks(path.read_text(encoding="utf-8")):
        joined = re.sub(r"\\\n\s*", " ", block)
        loops = dict(re.findall(r"^\s*for (\w+) in ([^;]+); do", joined, flags=re.MULTILINE))
        for line in joined.splitlines():
            line = line.split(" #")[0].strip()
            if not line.startswith("python -m pipeline."):
                continue
            variables = [v for v in loops if f"${v}" in line]
            expanded = [line]
            for var in variables:
                expanded = [e.replace(f"${var}", value) for e in expanded for value in loops[var].split()]
            commands += [(e, shlex.split(e)) for e in expanded]
    return commands


def check_composes(words: list[str]) -> str:
    """Compose the stage's config with the command's overrides, as ``--cfg job`` would; an unknown
    key, group or option raises. Returns why a command was not checked, or ""."""
    module = words[2]
    stage = module.removeprefix("pipeline.")
    if any("<" in word for word in words):
        # A placeholder (<generations_dir>, <prompt_id>) stands for the user's own value.
        return "placeholder"
    if stage not in STAGES:
        # Not a Hydra stage (pipeline.generate.regenerate is an argparse CLI): it must exist.
        assert importlib.util.find_spec(module) is not None, module
        return "not a stage"
    overrides = words[3:]
    multirun = "-m" in overrides
    overrides = [o for o in overrides if o not in ("-m", "--multirun")]
    assert all("=" in o for o in overrides), f"not an override: {overrides}"
    # A multirun's launcher (hydra/launcher=slurm, hydra.launcher.partition=...) lives in the
    # hydra node, composed here too; nothing is launched.
    compose_config(stage, overrides, return_hydra_config=multirun)
    return ""


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: str(p.relative_to(REPO)))
def test_every_stage_command_composes(path):
    commands = stage_commands(path)
    checked = 0
    for command, words in commands:
        try:
            skipped = check_composes(words)
        except Exception as error:  # noqa: BLE001 - name the command that failed
            raise AssertionError(f"{path.relative_to(REPO)}: `{command}` does not compose: {error}") from error
        checked += not skipped
    if path == README:
        # The README's worked example alone has more; a parser that finds nothing must fail.
        assert checked >= 10, commands


def test_a_wrong_key_in_a_command_is_caught():
    with pytest.raises(Exception, match="data.pathx"):
        check_composes(shlex.split("python -m pipeline.detect data=webdataset data.pathx=/y"))
    with pytest.raises(Exception, match="partitionx"):
        check_composes(shlex.split("python -m pipeline.generate -m hydra/launcher=slurm hydra.launcher.partitionx=gpu"))


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= 300, f"README.md has {lines} lines; deep material belongs in docs/"


def test_readme_leads_with_the_two_commands():
    text = README.read_text(encoding="utf-8")
    first_block = fenced_blocks(text)[0]
    assert "make demo" in first_block and "make test" in first_block


def test_docs_links_resolve():
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\((docs/[^)#\s]+)", text)
    assert links, "the README links no docs/ page"
    assert {REPO / link for link in links} >= set(DOCS), "a docs/ page the README does not link"
    for source in [README, *DOCS]:
        for link in re.findall(r"\]\(([^)#\s]+)", source.read_text(encoding="utf-8")):
            if "://" in link:
                continue
            assert (source.parent / link).exists(), f"{source.relative_to(REPO)}: {link} does not exist"
