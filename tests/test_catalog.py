"""The catalog: discovery in the HF cache and folders (files with real GGUF headers written by the
gguf package), names, pairing, collisions, auto/manual states across rescans, persistence."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import huggingface_hub.constants
import numpy as np
import pytest

from routerd.config import from_mapping
from routerd.errors import NotFound
from routerd.models import discovery, hub
from routerd.models.catalog import Catalog
from tests.conftest import make_config
from tests.fake_hub import FakeHub
from tests.test_control import call, rpc


def write_gguf(path: Path, kind: str = "model", arch: str = "llama") -> Path:
    """A small but real GGUF file: header, metadata and one tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(kind)
    writer.add_block_count(1)
    writer.add_context_length(2048)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def hf_repo(cache: Path, repo_id: str, files: dict[str, str], revision: str = "a" * 40, main: bool = True) -> Path:
    """A repo in huggingface_hub's cache layout: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    for name, kind in files.items():
        blob = repo / "blobs" / f"{abs(hash((revision, name))):x}"
        if kind == "incomplete":
            blob.parent.mkdir(parents=True, exist_ok=True)
            blob.with_suffix(".incomplete").write_bytes(b"GGUF partial")
            continue
        write_gguf(blob, kind)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(revision)
    return snapshot


def names(found) -> dict[str, str]:
    return {f.name: os.path.basename(f.path) for f in found}


def test_quant_tags_are_matched_like_llama_cpp():
    assert discovery.quant_of("Qwen2.5-7B-Instruct-Q4_K_M.gguf") == "Q4_K_M"
    assert discovery.quant_of("gemma-3-270m-q4_k_m.gguf") == "Q4_K_M"
    assert discovery.quant_of("model.Q8_0.gguf") == "Q8_0"
    assert discovery.quant_of("Q4_K_Mother.gguf") is None
    assert discovery.choose_quant(["Q8_0", "Q4_K_M", "F16"], None) == "Q4_K_M"
    assert discovery.choose_quant(["Q8_0", "F16"], None) == "Q8_0"
    assert discovery.choose_quant(["Q8_0", "F16"], "f16") == "F16"
    assert discovery.choose_quant(["Q8_0"], "Q2_K") is None


def test_hf_cache_repos_become_org_repo_quant_with_the_main_revision(tmp_path):
    cache = tmp_path / "hub"
    hf_repo(cache, "org/old", {"old-Q4_K_M.gguf": "model"}, revision="b" * 40, main=False)
    snapshot = hf_repo(cache, "org/chat", {"chat-Q4_K_M.gguf": "model", "chat-Q8_0.gguf": "model",
                                            "mmproj-chat-F16.gguf": "mmproj", "chat.imatrix.gguf": "imatrix",
                                            "half-Q2_K.gguf": "incomplete"})
    hf_repo(cache, "org/chat", {"chat-Q4_K_M.gguf": "model"}, revision="c" * 40, main=False)  # older revision
    hf_repo(cache, "org/split", {"big-Q4_K_M-00001-of-00002.gguf": "model", "big-Q4_K_M-00002-of-00002.gguf": "model",
                                 "bad-Q8_0-00001-of-00002.gguf": "model"})
    found = {f.name: f for f in discovery.scan_hf_cache(cache).found}
    assert set(found) == {"org/chat:Q4_K_M", "org/chat:Q8_0", "org/split:Q4_K_M", "org/old:Q4_K_M"}
    chat = found["org/chat:Q4_K_M"]
    assert chat.path.startswith(str(snapshot)) and chat.aliases == ("org/chat",)  # the default quant
    assert found["org/chat:Q8_0"].aliases == ()
    assert [os.path.basename(p) for p in chat.mmproj] == ["mmproj-chat-F16.gguf"]
    assert found["org/split:Q4_K_M"].path.endswith("big-Q4_K_M-00001-of-00002.gguf")  # one model, first part


def test_folders_are_searched_recursively_and_named_by_stem(tmp_path):
    write_gguf(tmp_path / "m" / "llama-3b.Q4_0.gguf")
    write_gguf(tmp_path / "m" / "vision" / "pixtral-q4.gguf")
    write_gguf(tmp_path / "m" / "vision" / "mmproj-pixtral-f16.gguf", kind="mmproj")
    write_gguf(tmp_path / "m" / "deep" / "er" / "x-00001-of-00002.gguf")
    write_gguf(tmp_path / "m" / "deep" / "er" / "x-00002-of-00002.gguf")
    write_gguf(tmp_path / "m" / "lonely-00001-of-00003.gguf")  # parts missing: an incomplete download
    write_gguf(tmp_path / "m" / "adapter.gguf", kind="adapter")
    (tmp_path / "m" / "notes.txt").write_text("not a model")
    (tmp_path / "m" / "broken.gguf").write_bytes(b"GGUF\x03 truncated")
    found = {f.name: f for f in discovery.scan_folder(tmp_path / "m")}
    assert set(found) == {"llama-3b.Q4_0", "pixtral-q4", "x"}
    assert [os.path.basename(p) for p in found["pixtral-q4"].mmproj] == ["mmproj-pixtral-f16.gguf"]
    assert found["llama-3b.Q4_0"].mmproj == ()


def test_name_collisions_resolve_by_source_precedence(tmp_path):
    write_gguf(tmp_path / "a" / "shared.gguf")
    write_gguf(tmp_path / "b" / "shared.gguf")
    write_gguf(tmp_path / "b" / "configured.gguf")
    config = from_mapping(make_config(tmp_path, {"configured": {"path": str(tmp_path / "elsewhere.gguf")}},
                                      catalog={"folders": [str(tmp_path / "a"), str(tmp_path / "b")]}))
    found = discovery.scan_folder(tmp_path / "a") + discovery.scan_folder(tmp_path / "b")
    catalog = Catalog.from_config(config, discovered=found)
    assert catalog.resolve("configured").source == "config"  # the config always wins
    assert catalog.resolve("shared").path == str(tmp_path / "a" / "shared.gguf")  # then the first folder
    assert len(catalog) == 2


async def test_rescan_drops_vanished_auto_models_but_keeps_manual_ones_unavailable(start_routerd, tmp_path):
    folder = tmp_path / "models"
    write_gguf(folder / "auto-one.gguf")
    loose = write_gguf(tmp_path / "loose" / "manual-one.gguf")
    r = await start_routerd(make_config(tmp_path, {}, catalog={"folders": [str(folder)]}))
    sock = r.daemon.socket_path
    assert [e.name for e in r.supervisor.catalog] == ["auto-one"]
    imported = (await rpc(sock, call("import", {"path": str(loose.parent)})))[0]["result"]
    assert imported["added"] == ["manual-one"]
    models = {m["name"]: m for m in (await rpc(sock, call("models")))[0]["result"]["models"]}
    assert models["auto-one"]["catalog"] == "auto" and models["manual-one"]["catalog"] == "manual"
    assert models["auto-one"]["metadata"]["architecture"] == "llama"

    os.remove(folder / "auto-one.gguf")
    os.remove(loose)
    rescan = (await rpc(sock, call("rescan")))[0]["result"]
    assert rescan["removed"] == ["auto-one"]
    manual = r.supervisor.catalog.resolve("manual-one")
    assert not manual.available
    assert (await r.http.post("/v1/completions", json={"model": "manual-one", "prompt": "x"})).status_code == 503

    write_gguf(folder / "auto-one.gguf")
    write_gguf(loose)
    rescan = (await rpc(sock, call("rescan")))[0]["result"]
    assert rescan["added"] == ["auto-one"] and r.supervisor.catalog.resolve("manual-one").available


async def test_imported_models_survive_a_restart_and_the_config_is_never_written(start_routerd, tmp_path):
    write_gguf(tmp_path / "loose" / "kept.gguf")
    first = await start_routerd(make_config(tmp_path, {}))
    config_text = first.config_path.read_text()
    await rpc(first.daemon.socket_path, call("import", {"path": str(tmp_path / "loose" / "kept.gguf")}))
    assert first.config_path.read_text() == config_text  # the user's file is never rewritten
    first.daemon.request_shutdown()
    data = make_config(tmp_path, {})
    data["control"]["socket"] = str(tmp_path / "second.sock")
    second = await start_routerd(data)
    assert second.supervisor.catalog.resolve("kept").source == "import"
    assert (tmp_path / "state" / "catalog.toml").exists()


async def test_import_of_a_path_without_models_is_a_clear_error(start_routerd, tmp_path):
    (tmp_path / "empty").mkdir()
    r = await start_routerd(make_config(tmp_path, {}))
    error = (await rpc(r.daemon.socket_path, call("import", {"path": str(tmp_path / "empty")})))[0]["error"]
    assert "no GGUF model found" in error["message"]


# -- pull -----------------------------------------------------------------------------------
def test_pull_chooses_files_like_llama_cpp():
    files = ["README.md", "m-Q8_0.gguf", "m-Q4_K_M.gguf", "m-F16-00001-of-00002.gguf", "m-F16-00002-of-00002.gguf",
             "mmproj-m-f16.gguf", "m.imatrix.gguf"]
    assert hub.plan_pull("o/m", files, None, None).files == ("m-Q4_K_M.gguf", "mmproj-m-f16.gguf")
    assert hub.plan_pull("o/m", files, "q8_0", None).files == ("m-Q8_0.gguf", "mmproj-m-f16.gguf")
    assert hub.plan_pull("o/m", files, "F16", None).files == (
        "m-F16-00001-of-00002.gguf", "m-F16-00002-of-00002.gguf", "mmproj-m-f16.gguf")
    assert hub.plan_pull("o/m", files, None, "m-Q8_0.gguf").tag == "Q8_0"
    with pytest.raises(NotFound) as missing:
        hub.plan_pull("o/m", files, "Q2_K", None)
    assert "available: F16, Q4_K_M, Q8_0" in missing.value.message


@pytest.fixture
def fake_hub(tmp_path):
    hub_server = FakeHub()
    tiny = write_gguf(tmp_path / "src" / "tiny.gguf").read_bytes()
    projector = write_gguf(tmp_path / "src" / "proj.gguf", kind="mmproj").read_bytes()
    hub_server.repos["org/tiny"] = {"tiny-Q4_K_M.gguf": tiny, "tiny-Q8_0.gguf": tiny,
                                    "mmproj-tiny-f16.gguf": projector, "README.md": b"# tiny"}
    hub_server.repos["org/split"] = {"s-Q8_0-00001-of-00002.gguf": tiny, "s-Q8_0-00002-of-00002.gguf": tiny}
    hub_server.repos["org/gated"] = {"g-Q4_K_M.gguf": tiny}
    hub_server.gated["org/gated"] = "secret"
    yield hub_server
    hub_server.close()


async def test_pull_downloads_into_the_hub_cache_and_the_model_is_served_at_once(start_routerd, tmp_path, fake_hub,
                                                                                 monkeypatch):
    # huggingface_hub writes whole chunks (10 MiB): a 1-MiB chunk lets a 3-MiB file show its resume.
    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 1 << 20)
    big = os.urandom(3 << 20)
    fake_hub.repos["org/tiny"]["tiny-Q4_K_M.gguf"] = write_gguf(tmp_path / "src" / "tiny.gguf").read_bytes() + big
    fake_hub.cuts["org/tiny/tiny-Q4_K_M.gguf"] = 99  # every download breaks half-way: the pull fails
    r = await start_routerd(make_config(tmp_path, {}), env={"HF_ENDPOINT": fake_hub.url})
    sock = r.daemon.socket_path
    interrupted = (await rpc(sock, call("pull", {"model": "org/tiny"})))[0]["error"]
    # It says what the next pull does (start over: nothing partial is kept), not that it resumes.
    assert "was interrupted" in interrupted["message"] and "resume" not in interrupted["message"]
    assert "pulling again downloads that file from its start" in interrupted["message"]
    assert "org/tiny:Q4_K_M" not in r.supervisor.catalog  # no half file is served
    assert not list((tmp_path / "hf-cache").rglob("*.incomplete"))  # nor kept: the next pull starts again
    failed_pull = len(fake_hub.downloads)
    fake_hub.cuts["org/tiny/tiny-Q4_K_M.gguf"] = 2  # two breaks: huggingface_hub retries within the pull
    result = (await rpc(sock, call("pull", {"model": "org/tiny"})))[0]["result"]
    assert result["model"] == "org/tiny:Q4_K_M" and result["files"] == ["tiny-Q4_K_M.gguf", "mmproj-tiny-f16.gguf"]
    # What the README says: the pull that failed is not resumed (this one starts at byte 0), and
    # within a pull each broken transfer resumes (a Range) from the last whole chunk written.
    starts = [start for key, start in fake_hub.downloads[failed_pull:] if key == "org/tiny/tiny-Q4_K_M.gguf"]
    assert len(starts) == 3 and starts[0] == 0 and 0 < starts[1] < starts[2], starts
    entry = r.supervisor.catalog.resolve("org/tiny:Q4_K_M")
    assert open(entry.path, "rb").read() == fake_hub.repos["org/tiny"]["tiny-Q4_K_M.gguf"]
    assert [os.path.basename(p) for p in entry.mmproj] == ["mmproj-tiny-f16.gguf"]
    answer = await r.http.post("/v1/completions", json={"model": "org/tiny", "prompt": "hi"})  # the default-quant alias
    assert answer.status_code == 200

    split = (await rpc(sock, call("pull", {"model": "org/split:q8_0"})))[0]["result"]
    assert split["files"] == ["s-Q8_0-00001-of-00002.gguf", "s-Q8_0-00002-of-00002.gguf"]
    assert "org/split:Q8_0" in r.supervisor.catalog


async def test_pull_errors_say_what_went_wrong(start_routerd, tmp_path, fake_hub):
    r = await start_routerd(make_config(tmp_path, {}), env={"HF_ENDPOINT": fake_hub.url})
    sock = r.daemon.socket_path

    async def pull_error(ref: str) -> dict:
        return (await rpc(sock, call("pull", {"model": ref})))[0]["error"]

    assert "org/nope was not found" in (await pull_error("org/nope"))["message"]
    assert "gated" in (await pull_error("org/gated"))["message"]
    missing = await pull_error("org/tiny:Q2_K")
    assert "no Q2_K model" in missing["message"] and "Q4_K_M, Q8_0" in missing["message"]
    assert "not org/repo" in (await pull_error("just-a-name"))["message"]
    data = make_config(tmp_path, {})
    data["control"]["socket"] = str(tmp_path / "offline.sock")
    offline = await start_routerd(data, env={"HF_ENDPOINT": fake_hub.url, "HF_HUB_OFFLINE": "1"})
    error = (await rpc(offline.daemon.socket_path, call("pull", {"model": "org/tiny"})))[0]["error"]
    assert "HF_HUB_OFFLINE is set" in error["message"]


async def test_pull_of_a_gated_repo_works_with_hf_token(start_routerd, tmp_path, fake_hub):
    r = await start_routerd(make_config(tmp_path, {}), env={"HF_ENDPOINT": fake_hub.url, "HF_TOKEN": "secret"})
    result = (await rpc(r.daemon.socket_path, call("pull", {"model": "org/gated"})))[0]["result"]
    assert result["model"] == "org/gated:Q4_K_M" and "org/gated:Q4_K_M" in r.supervisor.catalog
