"""llama.cpp's web UI at / (routerd/front/webui.py): taken from the llama-server routerd runs,
kept once seen, and routerd's own page where the build has none."""

from __future__ import annotations

from tests.conftest import make_config


async def test_the_web_ui_of_the_llama_server_build_is_served_at_the_root_once_a_backend_ran(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"), "args": ["--fake-webui"]}}))
    before = await r.http.get("/")
    assert before.status_code == 307 and before.headers["location"] == "/ui/"  # nothing ran yet: routerd's page
    assert (await r.http.post("/models/load", json={"model": "a"})).status_code == 200
    await r.supervisor.load("a")
    page = await r.http.get("/")
    assert page.status_code == 200 and page.headers["content-encoding"] == "gzip"  # as llama-server sent it
    assert page.headers["content-type"].startswith("text/html") and "fake web UI of" in page.text
    await r.http.post("/models/unload", json={"model": "a"})
    assert r.supervisor.running("a") is None
    kept = await r.http.get("/")  # kept: served with no model loaded
    assert kept.status_code == 200 and kept.text == page.text
    head = await r.http.head("/")
    assert head.status_code == 200 and head.content == b""


async def test_a_build_without_the_web_ui_sends_browsers_to_routerds_page(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    await r.supervisor.load("a")
    for _ in range(2):  # asked once; the answer is remembered
        answer = await r.http.get("/")
        assert answer.status_code == 307 and answer.headers["location"] == "/ui/"
    followed = await r.http.get("/", follow_redirects=True)
    assert followed.status_code == 200 and followed.url.path == "/ui/"
