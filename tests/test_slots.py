"""Conversations that survive a swap (routerd/backends/slots.py): llama-server's KV slots saved
as routerd stops a model on purpose and restored when it returns, against the real llama-server;
and the pure parts (the cache key, the disk budget)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

from routerctl.cli import main as routerctl
from routerd import llama_args
from routerd.backends.slots import SavedFile, cache_key, model_folder, over_budget
from tests.conftest import make_config, needs_real_llama
from tests.test_real_llama import real_config

SMOL, GEMMA = "smollm2-135m", "gemma3-270m"
WORDS = ("river", "mountain", "lantern", "harbor", "meadow", "copper", "violet", "engine", "garden", "signal",
         "winter", "marble", "thunder", "orchard", "compass", "velvet", "canyon", "ember", "glacier", "pepper")


# -- pure -------------------------------------------------------------------------------------
def test_a_saved_cache_is_valid_only_for_the_same_file_build_and_kv_arguments():
    flags = llama_args.parse_args(["--ctx-size", "4096", "--parallel", "2", "--temp", "0.7"])
    key = cache_key("/m.gguf", 100, 5, "b1", flags)
    assert key == cache_key("/m.gguf", 100, 5, "b1", llama_args.parse_args(
        ["--temp", "0.2", "--parallel", "2", "-c", "4096"]))  # sampling and order do not matter
    for other in [cache_key("/m.gguf", 101, 5, "b1", flags), cache_key("/m.gguf", 100, 6, "b1", flags),
                  cache_key("/n.gguf", 100, 5, "b1", flags), cache_key("/m.gguf", 100, 5, "b2", flags),
                  cache_key("/m.gguf", 100, 5, "b1", llama_args.parse_args(["--ctx-size", "8192", "--parallel", "2"])),
                  cache_key("/m.gguf", 100, 5, "b1",
                            llama_args.parse_args(["-c", "4096", "-np", "2", "-ctk", "q8_0"]))]:
        assert other != key
    assert model_folder("org/repo:Q4_K_M") != model_folder("org_repo:Q4_K_M")  # safe names stay apart
    assert "/" not in model_folder("org/repo:Q4_K_M")


@given(st.lists(st.builds(SavedFile, path=st.uuids().map(str), size=st.integers(0, 100),
                          used=st.floats(0, 1000)), max_size=12, unique_by=lambda f: f.path),
       st.integers(0, 600))
def test_the_disk_budget_removes_the_least_recently_used_files_and_no_more(files, budget):
    removed = set(over_budget(files, budget))
    kept = [f for f in files if f.path not in removed]
    assert sum(f.size for f in kept) <= budget or not kept  # within the budget...
    if removed:
        newest_removed = max((f.used, f.path) for f in files if f.path in removed)
        assert all((f.used, f.path) > newest_removed for f in kept)  # ...older ones gone first...
        last = max((f for f in files if f.path in removed), key=lambda f: (f.used, f.path))
        assert sum(f.size for f in kept) + last.size > budget  # ...and not one more than needed


# -- against the real llama-server -------------------------------------------------------------
def conversation(seed: int, words: int) -> list[dict[str, str]]:
    text = " ".join(WORDS[(i * 7 + seed * 3 + i // 5) % len(WORDS)] for i in range(words))
    return [{"role": "system", "content": "You are a careful reader of long lists."},
            {"role": "user", "content": f"Here is a list of words: {text}. Which word comes first?"}]


def slots_config(tmp_path: Path, parallel: int, **slots: object) -> dict:
    data = real_config(tmp_path, **{SMOL: {"args": ["--ctx-size", str(2400 * parallel), "--parallel", str(parallel)]},
                                    GEMMA: {}})
    data["backend"]["max_loaded_models"] = 1  # a request for the other model swaps
    data["slots"] = {"save_timeout": 20.0, **slots}
    return data


async def chat(r, messages: list[dict[str, str]], session: str | None = None, model: str = SMOL) -> dict:
    answer = await r.http.post("/v1/chat/completions", headers={"X-Session-Id": session} if session else {},
                               json={"model": model, "messages": messages, "max_tokens": 6, "temperature": 0})
    assert answer.status_code == 200, answer.text
    return answer.json()


def reused(answer: dict) -> float:
    """The share of the prompt llama-server found in its cache."""
    timings = answer["timings"]
    return timings["cache_n"] / (timings["cache_n"] + timings["prompt_n"])


async def next_turn(r, messages: list[dict[str, str]], first: dict, session: str | None = None) -> dict:
    follow = [*messages, first["choices"][0]["message"], {"role": "user", "content": "And which comes last?"}]
    return await chat(r, follow, session)


@pytest.mark.real
@needs_real_llama
async def test_a_conversation_survives_a_swap_away_and_back(start_routerd, tmp_path, capsys):
    r = await start_routerd(slots_config(tmp_path, parallel=1))
    messages = conversation(1, 1900)  # about 2,000 tokens
    first = await chat(r, messages)
    assert first["usage"]["prompt_tokens"] >= 1800
    await chat(r, [{"role": "user", "content": "Hi"}], model=GEMMA)  # SmolLM2 makes way: saved as it stops
    assert r.supervisor.running(SMOL) is None
    saved = r.supervisor.model_status(r.supervisor.catalog.resolve(SMOL)).saved_slots
    assert saved is not None and saved.slots == 1 and saved.tokens >= first["usage"]["prompt_tokens"]
    folder = Path(r.supervisor.slot_store.folder(SMOL))
    assert [oct(p.stat().st_mode & 0o777) for p in folder.glob("*.bin")] == ["0o600"]  # routerd's user's only
    assert await trio.to_thread.run_sync(routerctl, ["--socket", r.daemon.socket_path, "status", SMOL]) == 0
    assert f"saved_slots: 1 conversation(s), {saved.tokens} tokens" in capsys.readouterr().out
    follow = await next_turn(r, messages, first)  # SmolLM2 returns: restored before it took this
    assert reused(follow) >= 0.9, follow["timings"]
    metrics = (await r.http.get("/metrics")).text
    assert f'routerd_slots_total{{direction="restored",model="{SMOL}"}} 1.0' in metrics
    assert f'routerd_slots_total{{direction="saved",model="{SMOL}"}} 1.0' in metrics


@pytest.mark.real
@needs_real_llama
async def test_two_sessions_on_two_slots_each_find_their_conversation(start_routerd, tmp_path):
    r = await start_routerd(slots_config(tmp_path, parallel=2))
    talks = {"ann": conversation(2, 700), "bob": conversation(5, 700)}
    firsts = {session: await chat(r, messages, session) for session, messages in talks.items()}
    await chat(r, [{"role": "user", "content": "Hi"}], model=GEMMA)
    saved = r.supervisor.model_status(r.supervisor.catalog.resolve(SMOL)).saved_slots
    assert saved is not None and saved.slots == 2
    for session in ("bob", "ann"):  # the other order: each goes back to its own slot
        follow = await next_turn(r, talks[session], firsts[session], session)
        assert reused(follow) >= 0.9, (session, follow["timings"])


@pytest.mark.real
@needs_real_llama
async def test_a_corrupted_save_is_removed_and_the_request_served(start_routerd, tmp_path, caplog):
    caplog.set_level(logging.INFO, "routerd.slots")
    r = await start_routerd(slots_config(tmp_path, parallel=1))
    messages = conversation(3, 600)
    first = await chat(r, messages)
    await chat(r, [{"role": "user", "content": "Hi"}], model=GEMMA)
    folder = Path(r.supervisor.slot_store.folder(SMOL))
    [saved_file] = folder.glob("*.bin")
    saved_file.write_bytes(saved_file.read_bytes()[:1000])  # truncated
    follow = await next_turn(r, messages, first)
    assert follow["timings"]["cache_n"] == 0  # prefilled, and answered
    assert not saved_file.exists()
    assert any("could not restore it" in record.getMessage() for record in caplog.records)


@pytest.mark.real
@needs_real_llama
async def test_the_disk_budget_removes_the_oldest_saves(start_routerd, tmp_path):
    data = slots_config(tmp_path, parallel=1)
    data["models"][GEMMA]["args"] = ["--ctx-size", "2400"]
    r = await start_routerd(data)
    await chat(r, conversation(4, 300))  # SmolLM2 holds a conversation...
    await chat(r, conversation(6, 300), model=GEMMA)  # ...saved as Gemma comes in
    smol_files = list(Path(r.supervisor.slot_store.folder(SMOL)).glob("*.bin"))
    assert len(smol_files) == 1
    r.supervisor.slot_store.budget = smol_files[0].stat().st_size + 1  # room for one model's save
    seen: list[dict] = []
    with r.daemon.bus.subscribe() as subscription:
        await chat(r, conversation(4, 300))  # Gemma saved as SmolLM2 returns: SmolLM2's is the older
        with trio.move_on_after(2):
            async for event in subscription:
                seen.append(event.to_dict())
                if event.type == "slots.removed":
                    break
    assert list(Path(r.supervisor.slot_store.folder(GEMMA)).glob("*.bin"))
    removed = [e for e in seen if e["type"] == "slots.removed"]
    assert removed and removed[0]["reason"] == "disk_budget" and removed[0]["files"] == [str(smol_files[0])]
    assert not smol_files[0].exists()


async def test_a_sticky_session_is_sent_to_its_own_slot(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"m": {"path": model_file("m"), "args": ["--parallel", "2"]}}))

    async def ask(session: str | None, **body: object) -> None:
        answer = await r.http.post("/v1/chat/completions", headers={"X-Session-Id": session} if session else {},
                                   json={"model": "m", "messages": [{"role": "user", "content": "hi"}], **body})
        assert answer.status_code == 200
    for session in ("ann", "bob", "ann", "bob", None):
        await ask(session)
    await ask("cat", id_slot=1)  # a client's own choice stands
    await r.http.post("/v1/embeddings", headers={"X-Session-Id": "ann"}, json={"model": "m", "input": "x"})
    asked = (await r.http.get("/m/props")).json()["fake_id_slots"]
    assert asked[:4] == [0, 1, 0, 1] and asked[4] is None and asked[5] == 1  # each session keeps its slot
    assert asked[6] is None  # only generation routes take a slot
