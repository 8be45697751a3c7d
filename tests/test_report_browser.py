"""The report as a browser shows it: headless Chromium renders the page of a small synthetic run.

Checks what reading the HTML cannot: that the page really draws (a screenshot of the right size,
not one flat colour, with the card's planted sample colour beside the training image's), that
the rendered DOM holds the cards and the table of every prompt and no script, and that opening
it makes no network request. Needs Debian's ``chromium`` at /usr/bin/chromium (``.ci/run``
installs it where it can); without it every test here skips, saying so.
"""

from __future__ import annotations

import json
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.report import load_run, write_report
from tests.test_report import audited_run

CHROMIUM = Path("/usr/bin/chromium")
WINDOW = (1280, 2000)
SAMPLE_RGB = (255, 0, 255)  # prompt 00000's best sample, painted flat
MATCH_RGB = (0, 255, 255)  # and the training image it matched
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    # Whatever the browser itself still tries to fetch (update checks) resolves nowhere.
    "--host-resolver-rules=MAP * ~NOTFOUND",
]


def chromium(page: Path, work: Path, *options: str) -> subprocess.CompletedProcess:
    """Run headless Chromium on ``page`` with a fresh profile under ``work``; raises on failure."""
    if not CHROMIUM.is_file():
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to render the report in a browser"
        )
    profile = work / f"profile-{len(list(work.glob('profile-*')))}"
    command = [
        str(CHROMIUM),
        *FLAGS,
        f"--user-data-dir={profile}",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        *options,
        page.resolve().as_uri(),
    ]
    result = subprocess.run(command, capture_output=True, timeout=180)
    assert result.returncode == 0, result.stderr.decode("utf-8", "replace")[-3000:]
    return result


def page_requests(net_log: Path) -> list[str]:
    """URLs the page itself asked the network stack for, from a ``--log-net-log`` file.

    The browser makes requests of its own (component update checks) with no page behind them;
    those the page makes carry its site, file://, in their network isolation key.
    """
    log = json.loads(net_log.read_text(encoding="utf-8"))
    start = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    return [
        event["params"]["url"]
        for event in log["events"]
        if event["type"] == start and "file://" in str(event.get("params", {}).get("network_isolation_key", ""))
    ]


class Elements(HTMLParser):
    """Every start tag of a document as (tag, attributes), in order."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict[str, str]]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, {name: value or "" for name, value in attrs}))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict:
    """The report of a small run, its screenshot, net log and rendered DOM."""
    if not CHROMIUM.is_file():
        pytest.skip(
            f"{CHROMIUM} not found: install Debian's chromium (apt-get install chromium) to render the report in a browser"
        )
    root = tmp_path_factory.mktemp("browser")
    run_dir = audited_run(root, prescreen=True, colours=(SAMPLE_RGB, MATCH_RGB))
    page = write_report(load_run(run_dir / "detect"), root / "report" / "index.html", title="browser check")
    screenshot, net_log = root / "screenshot.png", root / "net.json"
    chromium(page, root, f"--screenshot={screenshot}", f"--log-net-log={net_log}")
    dom = chromium(page, root, "--dump-dom").stdout.decode("utf-8")
    return {"root": root, "page": page, "screenshot": screenshot, "net_log": net_log, "dom": dom}


def blocks(image: np.ndarray, colour: tuple[int, int, int], min_run: int) -> tuple[int, int, int, int] | None:
    """Bounding box (top, bottom, left, right) of the rows holding at least ``min_run`` pixels of
    ``colour`` (within 8 levels a channel): where a large flat image of it is drawn."""
    mask = (np.abs(image.astype(int) - colour) <= 8).all(axis=-1)
    rows = np.flatnonzero(mask.sum(axis=1) >= min_run)
    if not len(rows):
        return None
    columns = np.flatnonzero(mask[rows].any(axis=0))
    return int(rows[0]), int(rows[-1]), int(columns[0]), int(columns[-1])


def test_the_screenshot_is_a_real_render_with_the_sample_beside_the_training_image(rendered):
    with Image.open(rendered["screenshot"]) as shot:
        assert shot.format == "PNG" and shot.size == WINDOW
        pixels = np.asarray(shot.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100, "a blank page"
    # The card draws the 32-pixel sample and training image 256 pixels wide, side by side.
    sample, match = blocks(pixels, SAMPLE_RGB, 200), blocks(pixels, MATCH_RGB, 200)
    assert sample is not None, "the card's sample is not on screen"
    assert match is not None, "the card's training image is not on screen"
    for top, bottom, left, right in (sample, match):
        assert 250 <= bottom - top + 1 <= 262 and 250 <= right - left + 1 <= 262
    assert sample[3] < match[2] and abs(sample[0] - match[0]) <= 2, (sample, match)


def test_the_rendered_dom_has_the_cards_and_the_table(rendered):
    parser = Elements()
    parser.feed(rendered["dom"])
    tags = parser.tags
    cards = [attrs for tag, attrs in tags if tag == "section" and "card" in attrs.get("class", "").split()]
    assert len(cards) == 1 and cards[0]["id"] == "card-0"
    images = [attrs.get("class", "") for tag, attrs in tags if tag == "img"]
    assert images.count("thumb sample") == 1 and images.count("thumb match") == 1
    assert sum(1 for tag, attrs in tags if tag == "table" and attrs.get("class") == "prompts") == 1
    assert sum(1 for tag, attrs in tags if tag == "tr" and attrs.get("class") in ("extracted", "flagged", "")) == 3
    assert "python -m pipeline.generate.regenerate" in rendered["dom"] and "prescreen score" in rendered["dom"]
    # The caption's <script> is text, not an element.
    assert "script" not in {tag for tag, _ in tags} and "&lt;script&gt;alert" in rendered["dom"]


def test_opening_the_report_requests_nothing_from_the_network(rendered):
    parser = Elements()
    parser.feed(rendered["dom"])
    for tag, attrs in parser.tags:
        for name in ("src", "href", "srcset", "action", "data", "poster"):
            if name in attrs:
                value = attrs[name]
                assert value.startswith("data:image/png;base64,") or (name == "href" and value.startswith("#")), (
                    tag,
                    name,
                    value[:80],
                )
    assert page_requests(rendered["net_log"]) == []

    # The net log does show a page's request when there is one: the check above can fail.
    probe = rendered["root"] / "probe.html"
    probe.write_text('<!DOCTYPE html><p>probe</p><img src="http://127.0.0.1:9/probe.png">', encoding="utf-8")
    net_log = rendered["root"] / "probe.json"
    chromium(probe, rendered["root"], f"--log-net-log={net_log}", "--dump-dom")
    assert page_requests(net_log) == ["http://127.0.0.1:9/probe.png"]
