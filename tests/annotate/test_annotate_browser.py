"""A real browser: Debian's Chromium driven by Playwright (PyPI; no browser download). An annotator
signs in, labels three tasks by mouse and three by keyboard, a response carrying a script shows
as text, and the export holds exactly those labels."""

from __future__ import annotations

import os
import shutil
import warnings

import pytest
from annotate_helpers import SCRIPT, seed_round
from annotate_load import Server
from launch_helpers import free_port
from sqlalchemy import select

from alignkit.annotate.db import open_database
from alignkit.annotate.export import export_rows
from alignkit.annotate.ingest import add_annotator
from alignkit.annotate.schema import Annotation


def _chromium() -> str:
    for candidate in (
        os.environ.get("CHROMIUM"),
        "/usr/lib/chromium/chromium",
        shutil.which("chromium"),
    ):
        if candidate and os.path.exists(candidate):
            return candidate
    message = (
        "BROWSER TEST SKIPPED: no Chromium (apt-get install -y chromium, or set CHROMIUM=/path)"
    )
    warnings.warn(message, stacklevel=1)
    pytest.skip(message)


def test_an_annotator_labels_by_mouse_and_keyboard(tmp_path) -> None:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="BROWSER TEST SKIPPED: pip package playwright missing"
    )
    executable = _chromium()
    url = f"sqlite:///{tmp_path / 'browser.db'}"
    db = open_database(url)
    seed_round(db, n_prompts=6, annotators_per_task=1, script_in=0)
    token = add_annotator(db, "alice")
    server = Server(url, free_port())
    server.start()
    expected: list[tuple[str, str] | None] = []  # (chosen, rejected) per label, None for a tie
    try:
        with sync_api.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=executable, headless=True)
            page = browser.new_page()
            page.goto(server.base + "/")
            page.fill("#token", token)
            page.click("#signin-button")
            page.wait_for_selector("#work:not(.hidden)")
            assert "Keys:" in page.text_content(".keys") and "Enter" in page.text_content(".keys")
            saw_script = False
            for step, action in enumerate(["left", "right", "tie", "1", "2", "3"]):
                before = page.get_attribute("#work", "data-assignment")
                left, right = page.text_content("#left"), page.text_content("#right")
                assert page.text_content("#progress").startswith(f"Done: {step} ")
                if SCRIPT in left or SCRIPT in right:  # shown as its literal text, not run
                    saw_script = True
                    assert (
                        page.locator("#left b, #right b, #left script, #right script").count() == 0
                    )
                    assert page.evaluate("window.pwned") is None
                if action in ("left", "right", "tie"):  # mouse
                    page.click(f"#pick-{action}")
                    page.select_option("#confidence", "5")
                    page.click("#submit")
                    side = action
                else:  # keyboard
                    page.keyboard.press(action)
                    page.keyboard.press("Enter")
                    side = {"1": "left", "2": "right", "3": "tie"}[action]
                expected.append(
                    None if side == "tie" else ((left, right) if side == "left" else (right, left))
                )
                page.wait_for_function(
                    "b => document.getElementById('work').dataset.assignment !== b"
                    " || !document.getElementById('done').classList.contains('hidden')",
                    arg=before,
                )
            page.wait_for_selector("#done:not(.hidden)")
            assert saw_script
            browser.close()
    finally:
        server.stop()
    with db.read() as s:
        labels = s.scalars(select(Annotation).order_by(Annotation.id)).all()
    assert len(labels) == 6 and [a.confidence for a in labels] == [5, 5, 5, 3, 3, 3]
    assert all(a.seconds > 0 for a in labels)
    rows, report = export_rows(db)
    assert report.ties_dropped == 2  # the tie policy drops the two ties
    assert sorted((r["chosen"], r["rejected"]) for r in rows) == sorted(
        e for e in expected if e is not None
    )
