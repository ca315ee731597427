"""The board in a real headless Chromium (Debian's chromium, driven by Playwright), against a real
`tunelab board` process: a bad value shows the command line's error next to its field; a tiny-model
run launched from the form draws a curve that grows; Stop writes a checkpoint and Resume goes on
from it; a second run finishes; chat shows the base's and the trained model's answers side by side;
compare shows both runs, their config differences, overlaid curves and the registry's versions.

Screenshots of the four views go to $TUNELAB_BOARD_SCREENSHOTS when it is set (the README's come
from here: TUNELAB_BOARD_SCREENSHOTS=docs/board pytest tests/board/test_board_browser.py)."""

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tunelab.board.chat import free_port

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.fixture
def board(tmp_path):
    """`tunelab board` on a free port, with a registry that holds nothing yet."""
    port = free_port()
    registry = f"sqlite:///{tmp_path / 'registry.db'}"
    log = open(tmp_path / "board.out", "wb")
    process = subprocess.Popen([sys.executable, "-m", "tunelab", "board", "--runs-dir", str(tmp_path / "runs"), "--port", str(port),
                                "--registry-url", registry], stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            urllib.request.urlopen(url + "/api/form", timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError("the board did not start: " + (tmp_path / "board.out").read_text())
            time.sleep(0.3)
    yield url, tmp_path / "runs", registry
    process.terminate()
    process.wait(timeout=30)
    for pid_file in (tmp_path / "runs").glob("*/board.json"):  # a run left going by a failed assertion
        pid = json.loads(pid_file.read_text()).get("pid")
        try:
            os.kill(pid, 9)
        except (ProcessLookupError, TypeError):
            pass


@pytest.fixture
def page():
    required = os.environ.get("TUNELAB_REQUIRE_BROWSER") == "1"  # .ci/run: a missing browser fails, not skips
    if CHROMIUM is None:
        (pytest.fail if required else pytest.skip)("Debian's chromium is not installed (apt install chromium); .ci/run installs it")
    try:
        from playwright import sync_api
    except ImportError:
        (pytest.fail if required else pytest.skip)("playwright is not installed (a dev dependency: pip install -e '.[dev]')")
    with sync_api.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        errors = []
        page.on("pageerror", lambda err: errors.append(str(err)))
        yield page
        browser.close()
        assert errors == [], errors  # no script error on the page at any point


def points(page, chart: str, run: str) -> int:
    return page.evaluate(f"+(document.querySelector('#{chart} path[data-run=\"{run}\"]')?.dataset.points || 0)")


def status(page, run: str) -> str:
    return page.get_attribute(f"#runs-table tr[data-run='{run}']", "data-status")


def launch(page, name: str, lr: str, max_steps: str) -> None:
    page.goto(page.url.split("#")[0] + "#launch")
    page.wait_for_selector("#field-name")
    page.select_option("#field-modelpool", "CausalLMPool/tiny-llama")
    page.fill("#field-name", name)
    page.fill("#field-method\\.optimizer\\.lr", lr)
    page.fill("#field-method\\.max_steps", max_steps)
    page.fill("#field-extra", "method.lr_scheduler.warmup_steps=2\nmethod.max_length=256")
    page.click("#launch")
    page.wait_for_selector(f"#runs-table tr[data-run='{name}']")


def test_launch_watch_stop_resume_chat_and_compare_in_chromium(board, page, capsys):
    url, runs, registry = board
    shots = Path(os.environ.get("TUNELAB_BOARD_SCREENSHOTS") or runs.parent / "shots")
    shots.mkdir(parents=True, exist_ok=True)
    page.goto(url + "/#launch")
    page.wait_for_selector("#field-name")

    # A bad value: the command line's own error, next to the field, and no run started.
    page.select_option("#field-modelpool", "CausalLMPool/tiny-llama")
    page.fill("#field-method\\.optimizer\\.lr", "-0.1")
    page.click("#validate")
    page.wait_for_function("document.querySelector('.error[data-for=\"method.optimizer.lr\"]').textContent.length > 0")
    shown = page.text_content(".error[data-for='method.optimizer.lr']")
    from tunelab.cli.main import main

    assert main(["train", "modelpool=CausalLMPool/tiny-llama", "data=gsm8k-demo", "method.optimizer.lr=-0.1"]) == 2
    assert shown == capsys.readouterr().err.removeprefix("error: ").strip()
    assert "must be positive" in shown and page.get_attribute(".field[data-field='method.optimizer.lr']", "class").endswith("invalid")
    page.screenshot(path=str(shots / "launch.png"), full_page=True)

    # Launch a run with no end; its curve grows while we watch; Stop; Resume goes on from the checkpoint.
    launch(page, "long", "1e-3", "100000")
    page.wait_for_function("+(document.querySelector('#chart-loss path[data-run=\"long\"]')?.dataset.points || 0) >= 3", timeout=180_000)
    seen = points(page, "chart-loss", "long")
    page.wait_for_function(f"+(document.querySelector('#chart-loss path[data-run=\"long\"]')?.dataset.points || 0) > {seen}", timeout=60_000)
    page.click("#runs-table button.stop[data-run='long']")
    page.wait_for_function("document.querySelector(\"#runs-table tr[data-run='long']\").dataset.status === 'stopped'", timeout=120_000)
    stopped_at = json.loads((runs / "long" / "summary.json").read_text())["global_step"]
    assert (runs / "long" / "checkpoints" / "latest").read_text().strip() == f"step-{stopped_at:06d}"
    assert (runs / "long" / "checkpoints" / f"step-{stopped_at:06d}" / "model.safetensors").is_file()  # hf: what chat loads
    page.click("#runs-table button.resume[data-run='long']")
    page.wait_for_function(f"+document.querySelector(\"#runs-table tr[data-run='long'] td.step\").textContent.split(' ')[0] > {stopped_at + 2}",
                           timeout=180_000)  # fmt: skip
    assert "Resumed from" in (runs / "long" / "board.log").read_text()
    page.click("#runs-table button.stop[data-run='long']")
    page.wait_for_function("document.querySelector(\"#runs-table tr[data-run='long']\").dataset.status === 'stopped'", timeout=120_000)

    # A second run that finishes; both on the charts at once.
    launch(page, "short", "3e-3", "12")
    page.wait_for_function("document.querySelector(\"#runs-table tr[data-run='short']\").dataset.status === 'finished'", timeout=180_000)
    page.check("#runs-table input[data-run='long']")
    page.wait_for_function("+(document.querySelector('#chart-loss path[data-run=\"short\"]')?.dataset.points || 0) === 12")
    assert points(page, "chart-loss", "long") > stopped_at and points(page, "chart-eval", "short") >= 2
    page.screenshot(path=str(shots / "watch.png"), full_page=True)

    # Chat: the base and the trained model answer the same prompt.
    page.goto(url + "/#chat")
    page.select_option("#chat-run", "short")
    page.fill("#chat-prompt", "Natalia sold clips to 48 of her friends in April. How many clips did she sell?")
    page.fill("#chat-max-tokens", "12")
    page.click("#chat-send")
    page.wait_for_function("document.querySelector('#chat-tuned-meta').textContent.includes('tokens')", timeout=300_000)
    assert page.text_content("#chat-base-meta").startswith("12 tokens") and page.text_content("#chat-tuned-meta").startswith("12 tokens")
    assert page.text_content("#chat-base") != page.text_content("#chat-tuned")  # 12 steps at lr 3e-3 changed the answer
    assert "step-000012" in page.text_content("#chat-state")
    page.screenshot(path=str(shots / "chat.png"), full_page=True)

    # Compare: both runs' final numbers, what differs in their configs, overlaid curves, the registry.
    from tunelab.deploy.registry import Registry

    Registry(registry).register("gsm8k-tiny", runs / "short")
    page.goto(url + "/#compare")
    page.check("#compare-pick input[value='long']")
    page.check("#compare-pick input[value='short']")
    page.click("#compare-go")
    page.wait_for_selector("#registry tr[data-ref='gsm8k-tiny@1']")
    assert page.text_content("#compare-finals tr[data-run='short'] td[data-key='steps']") == "12"
    assert page.text_content("#compare-finals tr[data-run='long'] td[data-key='status']") == "stopped"
    for key in ("method.optimizer.lr", "method.max_steps"):
        assert page.is_visible(f"#compare-diff tr[data-key='{key}']")
    assert points(page, "chart-compare", "short") == 12 and points(page, "chart-compare", "long") > stopped_at
    assert "short" in page.text_content("#registry tr[data-ref='gsm8k-tiny@1']")
    page.screenshot(path=str(shots / "compare.png"), full_page=True)
