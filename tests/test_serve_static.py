"""The page of `lmschool serve` (lmschool/serve/static/) in a real browser: headless Chromium (Debian's `chromium` package,
installed here when missing, driven by Playwright through `executable_path`) loads the page,
sends a chat message and sees the streamed answer, runs a comparison of two checkpoints with the
teacher's scores, opens the report, and saves a screenshot of the comparison as a test artifact
(tests/artifacts/serve-compare.png, its path printed)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from serve_fixtures import TAUGHT, LiveServer, pipeline_run

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
pytestmark = pytest.mark.usefixtures("one_thread")


def install_chromium() -> str | None:
    """The path of Debian's chromium, installed with apt-get (as root) when it is missing; None
    with the reason printed when it cannot be."""
    found = shutil.which("chromium")
    if found:
        return found
    if not shutil.which("apt-get") or os.geteuid() != 0:
        print("chromium is not installed, and it can only be installed with apt-get as root")
        return None
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for args in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        result = subprocess.run(args, capture_output=True, text=True, env=env, timeout=1800)
        if result.returncode != 0:
            print(f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
            return None
    return shutil.which("chromium")


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install '.[dev]')")
    executable = install_chromium()
    if executable is None:
        pytest.skip("Debian's chromium package is not installed and could not be installed (apt-get install "
                    "chromium as root): the page is not tested in a browser here")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, world):
    from lmschool.serve import models as catalog

    run = pipeline_run(tmp_path_factory.mktemp("browser"), world)
    specs, report_run = catalog.find([str(run)])
    live = LiveServer(catalog.load(specs, torch.device("cpu")), report_run=report_run)
    yield live
    live.close()


def test_chat_compare_and_report_in_a_browser(browser, server):
    page = browser.new_page(viewport={"width": 1100, "height": 760})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server.url + "/")
    page.wait_for_selector("body[data-ready='1']")
    assert page.locator("#chat-model").input_value() == "sft"

    # chat: a streamed answer (more than one piece arrived), the taught one at temperature 0
    page.fill("#chat-temperature", "0")
    page.fill("#chat-input", "Hi!")
    page.click("#chat-send")
    answer = page.locator(".msg.assistant").last
    page.wait_for_selector(".msg.assistant[data-done='1']")
    assert answer.evaluate("e => e.firstChild.textContent") == "Hello! How can I help?"
    assert int(answer.get_attribute("data-chunks")) > 1
    page.click("#chat-reset")                       # a new conversation; Enter sends
    page.fill("#chat-input", "What is 2 plus 3?")
    page.press("#chat-input", "Enter")
    page.wait_for_function("document.querySelectorAll(\".msg:not(.user)[data-done='1']\").length == 1")
    second = page.locator(".msg:not(.user)").last
    assert second.get_attribute("class") == "msg assistant", second.inner_text()
    assert second.evaluate("e => e.firstChild.textContent") == "2 plus 3 is 5."

    # compare: both checkpoints answer side by side, each with the teacher's score
    page.click("button[data-view='compare']")
    checked = page.locator("#compare-models input:checked")
    assert sorted(checked.evaluate_all("boxes => boxes.map(b => b.value)")) == ["dpo", "sft"]
    page.fill("#compare-input", "Hi!")
    page.click("#compare-run")
    page.wait_for_selector("#compare-out[data-done='1']")
    cards = {c.get_attribute("data-model"): c for c in page.locator(".card").all()}
    for model in ("sft", "dpo"):
        assert cards[model].locator(".answer").inner_text() == dict(TAUGHT[model])["Hi!"]
        score = float(cards[model].locator(".score").inner_text())
        assert 0 <= score <= 1 and "correctness" in cards[model].locator(".parts").inner_text()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-compare.png"
    page.screenshot(path=str(shot), full_page=True)
    print(f"screenshot of the compare view: {shot}")
    assert shot.stat().st_size > 10_000

    # report: the run's report.md as a page, its table and its plot
    page.click("#report-tab")
    page.wait_for_selector("#report-body[data-loaded='1']")
    assert page.locator("#report-body table td").first.inner_text() == "SFT"
    page.wait_for_function("document.querySelector('#report-body img').naturalWidth > 0")
    assert not errors, errors
    page.close()
