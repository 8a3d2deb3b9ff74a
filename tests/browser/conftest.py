"""Browser tests: the console served for real (uvicorn on a free port) and driven by Debian's
headless Chromium through Playwright's Python package (no browser download: the system
Chromium, ``apt-get install chromium``, which ``./dev setup`` installs when missing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.browser.console_support import CHROMIUM, CHROMIUM_ARGS


@pytest.fixture(scope="session")
def browser() -> Iterator[Any]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} missing: run ./dev setup (apt-get install chromium)",
                    pytrace=False)
    from playwright.sync_api import sync_playwright

    # launch() gives every browser a fresh temporary --user-data-dir of its own (Playwright
    # refuses one in args; launch_persistent_context is the other way)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield b
        finally:
            b.close()


