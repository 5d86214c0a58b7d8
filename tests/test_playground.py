"""The status page's playground (/ui/, "Playground") in headless Chromium against routerd serving
the real demo models: a streamed chat that loads its model, per-model conversations and
settings, stopping an answer, errors and keys.

``ROUTERD_PLAYGROUND_SHOT=docs/playground.png`` also saves the two-turn conversation of the first
test there (the README's picture); every run saves it under the test's tmp dir."""

from __future__ import annotations

import os
from functools import partial
from itertools import pairwise
from typing import Any

import pytest
import trio

from routerd.front.keys import KeySettings
from tests.conftest import Routerd, needs_real_llama
from tests.test_page import Browser, enter_key, needs_browser
from tests.test_real_llama import real_config

pytestmark = [pytest.mark.real, needs_real_llama, needs_browser]

#: gemma3 270m's GGUF has no chat template: llama.cpp's built-in "gemma" one (without --no-jinja
#: llama-server would take the name itself for a Jinja template, and the prompt would be "gemma").
GEMMA = {"args": ["--no-jinja", "--chat-template", "gemma"]}
#: Time for a cold model to load and answer a few tokens on a small CPU machine.
ANSWER_TIMEOUT = 120.0

PICK = "const s = document.getElementById('pg-model'); s.value = arguments[0]; s.dispatchEvent(new Event('change'));"
LAST_ANSWER = "[...document.querySelectorAll('#pg-log [data-role=assistant]')].at(-1)"
#: Records what the page does from now on (until a reload): every chat request it sends (body and
#: headers, by wrapping fetch), each text the newest answer shows, and each loading line shown.
RECORD = f"""
    window.seen = {{requests: [], texts: [], waits: []}};
    const send = window.fetch;
    window.fetch = (url, init) => {{
        if (String(url).endsWith('/v1/chat/completions')) {{
            window.seen.requests.push({{body: JSON.parse(init.body), headers: init.headers}});
        }}
        return send(url, init);
    }};
    new MutationObserver(() => {{
        const answer = {LAST_ANSWER};
        if (!answer) return;
        const text = answer.querySelector(':scope > .msg-text').textContent;
        if (text !== window.seen.texts.at(-1)) window.seen.texts.push(text);
        const wait = answer.querySelector('.msg-wait');
        if (!wait.hidden && wait.textContent) window.seen.waits.push(wait.textContent);
    }}).observe(document.getElementById('pg-log'), {{childList: true, subtree: true, characterData: true}});"""
ANSWER = f"""
    const answer = {LAST_ANSWER};
    if (!answer) return null;
    const figures = {{}};
    for (const f of answer.querySelectorAll('[data-figure]')) {{
        figures[f.dataset.figure] = {{value: f.dataset.value, text: f.textContent, title: f.title}};
    }}
    const note = answer.querySelector('.msg-note');
    return {{state: answer.dataset.state, text: answer.querySelector(':scope > .msg-text').textContent,
             waiting: !answer.querySelector('.msg-wait').hidden, figures,
             note: note.hidden ? '' : note.textContent, note_is_error: note.classList.contains('error')}};"""
TURNS = "return [...document.querySelectorAll('#pg-log [data-role]')].map(t => t.dataset.role);"
SETTINGS = ("return ['pg-system', 'pg-temperature', 'pg-top-p', 'pg-max-tokens', 'pg-seed']"
            ".map(id => document.getElementById(id).value);")


async def open_page(browser: Browser, r: Routerd) -> None:
    await browser.run(browser.driver.get, r.url + "/ui/")
    await browser.until("return document.getElementById('connection').dataset.state === 'live'")
    await browser.until("return document.querySelectorAll('#pg-model option').length > 1")


async def pick(browser: Browser, model: str) -> None:
    await browser.script(PICK, model)
    assert await browser.script("return document.getElementById('pg-settings-model').textContent") == model


async def type_into(browser: Browser, element_id: str, text: str) -> None:
    """Type as a person does (the page saves settings on input, sends on Enter)."""
    from selenium.webdriver.common.by import By

    field = await browser.run(browser.driver.find_element, By.ID, element_id)
    await browser.run(field.clear)
    await browser.run(field.send_keys, text)


async def say(browser: Browser, text: str, *, timeout: float = ANSWER_TIMEOUT) -> dict[str, Any]:
    """Send ``text`` with Enter and wait for the answer's end; returns what it shows (ANSWER)."""
    from selenium.webdriver.common.keys import Keys

    turns = len(await browser.script(TURNS))
    await type_into(browser, "pg-input", text + Keys.ENTER)
    await browser.until(f"return document.querySelectorAll('#pg-log [data-role]').length === {turns + 2}")
    await browser.until(f"const a = {LAST_ANSWER}; return ['done', 'stopped', 'error'].includes(a.dataset.state)",
                        timeout=timeout)
    answer: dict[str, Any] = await browser.script(ANSWER)
    return answer


async def model_view(r: Routerd, name: str) -> dict[str, Any]:
    listing = (await r.http.get("/v1/models")).json()["data"]
    found: dict[str, Any] = next(m for m in listing if m["id"] == name)
    return found


def assert_llama_server_figures(answer: dict[str, Any]) -> None:
    """Time to first token and tokens/s from llama-server's own timings, both above zero."""
    figures = answer["figures"]
    assert float(figures["ttft"]["value"]) > 0 and figures["ttft"]["text"].startswith("first token ")
    assert float(figures["tps"]["value"]) > 0 and figures["tps"]["text"].endswith(" tokens/s")
    assert figures["ttft"]["title"].startswith("llama-server read"), figures  # not the browser's clock
    assert int(figures["tokens"]["value"]) > 0


async def picture(browser: Browser, path: Any) -> None:
    """The playground in a 1280x900 page (a headless window's page is shorter than its window)."""
    metrics = {"width": 1280, "height": 900, "deviceScaleFactor": 1, "mobile": False}
    await browser.run(browser.driver.execute_cdp_cmd, "Emulation.setDeviceMetricsOverride", metrics)
    try:
        await browser.script("document.getElementById('playground').scrollIntoView()")
        await browser.shot(path)
    finally:
        await browser.run(browser.driver.execute_cdp_cmd, "Emulation.clearDeviceMetricsOverride", {})


@pytest.fixture
async def browser() -> Any:
    made = await trio.to_thread.run_sync(partial(Browser, 1280, 900))
    try:
        yield made
    finally:
        await trio.to_thread.run_sync(made.close)


async def test_a_streamed_chat_loads_its_model_shows_figures_and_keeps_conversations_and_settings_per_model(
        start_routerd, tmp_path, browser):
    data = real_config(tmp_path, **{"smollm2-135m": {"aliases": ["smol"]}, "gemma3-270m": GEMMA})
    data["selectors"] = {"tiny": {"targets": ["smollm2-135m", "gemma3-270m"]}}
    r = await start_routerd(data)
    await open_page(browser, r)
    # Each real model once (not its alias), and the virtual model.
    choices = await browser.script("return [...document.querySelectorAll('#pg-model option')].map(o => o.value)")
    assert sorted(choices) == ["", "gemma3-270m", "smollm2-135m", "tiny"]
    assert await browser.script("return document.querySelector('#pg-model optgroup option').value") == "tiny"

    # Model A, cold: its settings, then a message. The answer streams in after a shown load.
    await pick(browser, "smollm2-135m")
    assert (await model_view(r, "smollm2-135m"))["state"] == "unloaded"
    await type_into(browser, "pg-system", "You are a helpful assistant. Answer briefly.")
    await type_into(browser, "pg-temperature", "0.2")
    await type_into(browser, "pg-max-tokens", "24")
    await browser.script(RECORD)
    first = await say(browser, "Name three colors.")
    assert first["state"] == "done" and first["text"].strip(), first
    seen = await browser.script("return window.seen")
    texts = seen["texts"]
    assert texts[-1] == first["text"] and len([t for t in texts if t]) >= 3, texts  # token by token
    assert all(b.startswith(a) for a, b in pairwise(texts)), texts  # each one grew the last
    assert any(w.startswith("loading smollm2-135m") for w in seen["waits"]), seen["waits"]
    assert not first["waiting"]  # gone with the first token
    assert_llama_server_figures(first)
    sent = seen["requests"][0]["body"]
    assert sent["model"] == "smollm2-135m" and sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}
    assert sent["temperature"] == 0.2 and sent["max_tokens"] == 24 and "seed" not in sent
    assert sent["messages"] == [{"role": "system", "content": "You are a helpful assistant. Answer briefly."},
                                {"role": "user", "content": "Name three colors."}]

    # A second turn carries the first.
    second = await say(browser, "Which one is the warmest?")
    assert second["state"] == "done" and second["text"].strip()
    assert_llama_server_figures(second)
    assert (await browser.script("return window.seen"))["requests"][1]["body"]["messages"][1:] == [
        {"role": "user", "content": "Name three colors."}, {"role": "assistant", "content": first["text"]},
        {"role": "user", "content": "Which one is the warmest?"}]
    assert await browser.script(TURNS) == ["user", "assistant", "user", "assistant"]
    await picture(browser, tmp_path / "playground.png")
    if os.environ.get("ROUTERD_PLAYGROUND_SHOT"):
        await picture(browser, os.environ["ROUTERD_PLAYGROUND_SHOT"])

    # Model B: its own (empty) conversation and settings; B loads and answers.
    await pick(browser, "gemma3-270m")
    assert await browser.script(TURNS) == []
    assert await browser.script(SETTINGS) == ["", "", "", "", ""]
    await type_into(browser, "pg-max-tokens", "16")
    answer = await say(browser, "Say hello.")
    assert answer["state"] == "done" and answer["text"].strip(), answer
    assert_llama_server_figures(answer)
    seen = await browser.script("return window.seen")
    assert seen["requests"][2]["body"]["messages"] == [{"role": "user", "content": "Say hello."}]
    assert any(w.startswith("loading gemma3-270m") for w in seen["waits"]), seen["waits"]
    served = await model_view(r, "gemma3-270m")
    assert served["state"] == "ready" and served["last_used"], served  # B served it
    await browser.until("return document.getElementById('request-log').textContent"
                        ".includes('gemma3-270m POST /v1/chat/completions 200')")

    # Back to A: its conversation and settings are there again.
    await pick(browser, "smollm2-135m")
    assert await browser.script(TURNS) == ["user", "assistant", "user", "assistant"]
    a_settings = ["You are a helpful assistant. Answer briefly.", "0.2", "", "24", ""]
    assert await browser.script(SETTINGS) == a_settings

    # After a reload: the last pick, and each model's settings (conversations lived in the page).
    await open_page(browser, r)
    assert await browser.until("return document.getElementById('pg-model').value") == "smollm2-135m"
    assert await browser.script(SETTINGS) == a_settings
    assert await browser.script(TURNS) == []
    await pick(browser, "gemma3-270m")
    assert await browser.script(SETTINGS) == ["", "", "", "16", ""]
    await pick(browser, "smollm2-135m")
    assert await browser.script(SETTINGS) == a_settings


async def test_stop_keeps_the_partial_answer_marked_stopped_and_frees_the_model(start_routerd, tmp_path, browser):
    r = await start_routerd(real_config(tmp_path, **{"smollm2-135m": {}}))
    await open_page(browser, r)
    await pick(browser, "smollm2-135m")
    await type_into(browser, "pg-max-tokens", "2000")
    await browser.script(RECORD)
    await type_into(browser, "pg-input", "Write a long story about a dragon who learns to cook.\n")
    await browser.until(f"return {LAST_ANSWER}?.dataset.state === 'streaming'", timeout=ANSWER_TIMEOUT)
    assert await browser.script("return !document.getElementById('pg-stop').hidden")
    await browser.script("document.getElementById('pg-stop').click()")
    await browser.until(f"return {LAST_ANSWER}.dataset.state !== 'streaming'")
    stopped = await browser.script(ANSWER)
    assert stopped["state"] == "stopped" and stopped["note"] == "stopped" and stopped["text"].strip(), stopped
    # No timings come with a cut stream: the figures are the browser's own.
    assert float(stopped["figures"]["ttft"]["value"]) > 0
    assert stopped["figures"]["ttft"]["title"].startswith("measured in this browser")
    assert 0 < int(stopped["figures"]["tokens"]["value"]) < 2000
    assert await browser.script("return document.getElementById('pg-stop').hidden")
    assert not await browser.script("return document.getElementById('pg-send').disabled")

    # routerd has no request in flight, and llama-server stopped generating.
    with trio.fail_after(5):
        while True:
            model = await model_view(r, "smollm2-135m")
            slots = (await r.http.get("/upstream/smollm2-135m/slots")).json()
            if model["in_flight"] == 0 and not any(slot["is_processing"] for slot in slots):
                break
            await trio.sleep(0.1)
    await trio.sleep(0.5)
    assert (await browser.script(ANSWER))["text"] == stopped["text"]  # nothing more arrived

    # The partial answer is part of the conversation the next message carries.
    await type_into(browser, "pg-max-tokens", "8")
    follow_up = await say(browser, "Thanks!")
    assert follow_up["state"] == "done" and follow_up["note"] == "reached max_tokens", follow_up
    messages = (await browser.script("return window.seen"))["requests"][1]["body"]["messages"]
    assert messages[1] == {"role": "assistant", "content": stopped["text"]} and len(messages) == 3


async def test_an_error_shows_in_the_conversation_and_the_key_is_sent(start_routerd, tmp_path, browser):
    data = real_config(tmp_path, **{"smollm2-135m": {}})
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not really a gguf")  # llama-server exits while loading it
    data["models"]["junk"] = {"path": str(junk)}
    r = await start_routerd(data)
    r.daemon.gate.add("ops", KeySettings(admin=True))  # keys are required from now on
    team, _ = r.daemon.gate.add("team")
    await browser.run(browser.driver.get, r.url + "/ui/")
    await enter_key(browser, team)
    await browser.until("return document.getElementById('connection').dataset.state === 'live'")
    await browser.until("return document.querySelectorAll('#pg-model option').length > 1")
    await browser.script(RECORD)

    # A model that fails to load: routerd's error (status, code, message) is said in the
    # conversation, and the failed exchange is not sent again with the next message.
    await pick(browser, "junk")
    failed = await say(browser, "Hello?")
    assert failed["state"] == "error" and failed["note_is_error"] and not failed["text"], failed
    assert failed["note"].startswith("Error 503 (backend_start_failed): model 'junk' failed to start"), failed
    assert any(w.startswith("loading junk") for w in (await browser.script("return window.seen"))["waits"])
    await type_into(browser, "pg-max-tokens", "4")
    again = await say(browser, "Hello again?")
    assert again["state"] == "error", again
    requests = (await browser.script("return window.seen"))["requests"]
    assert requests[1]["body"]["messages"] == [{"role": "user", "content": "Hello again?"}]
    assert requests[0]["headers"]["Authorization"] == f"Bearer {team}"

    # The same key, on a model that loads: answered (routerd requires keys, so it was sent).
    await pick(browser, "smollm2-135m")
    await type_into(browser, "pg-max-tokens", "8")
    answer = await say(browser, "Hello!")
    assert answer["state"] == "done" and answer["text"].strip(), answer
    listing = (await r.http.get("/v1/models", headers={"Authorization": f"Bearer {team}"})).json()["data"]
    assert next(m for m in listing if m["id"] == "smollm2-135m")["state"] == "ready"
