"""One set of operations: the control socket and the admin HTTP API run the same operation and
answer the same fields (routerctl and the status page read them)."""

from __future__ import annotations

import json
from typing import Any

import attrs

from routerd.front import operations
from routerd.front.keys import ApiKey, KeySettings
from routerd.ops.control import KeyAddParams
from tests.conftest import make_config
from tests.test_control import call, rpc


async def test_socket_and_admin_api_answer_load_unload_reset_logs_and_rescan_alike(start_routerd, tmp_path,
                                                                                   model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}, "b": {"path": model_file("b")}}))
    admin, _ = r.daemon.gate.add("ops", KeySettings(admin=True))
    auth = {"Authorization": f"Bearer {admin}"}

    async def by_socket(method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        reply = (await rpc(r.daemon.socket_path, call(method, params)))[0]
        assert "result" in reply, reply
        return reply["result"]

    async def by_http(path: str, *, post: bool = True) -> dict[str, Any]:
        response = await (r.http.post(path, headers=auth) if post else r.http.get(path, headers=auth))
        assert response.status_code == 200, response.text
        return response.json()

    loaded = {"socket": await by_socket("load", {"model": "a", "wait": True}),
              "http": await by_http("/admin/models/b/load")}
    for edge, model in (("socket", "a"), ("http", "b")):
        result = loaded[edge]
        assert set(result) == {"model", "state", "pid", "port", "load_seconds"}, edge
        backend = r.supervisor.running(model)
        assert (result["model"], result["state"], result["pid"], result["port"]) == \
            (model, "ready", backend.pid, backend.port), edge
        assert result["load_seconds"] > 0, edge

    logs = {"socket": await by_socket("logs", {"model": "a", "lines": 3}),
            "http": await by_http("/admin/models/b/logs?lines=3", post=False)}
    assert logs["socket"].keys() == logs["http"].keys() == {"model", "lines", "running"}
    assert all(result["running"] and 0 < len(result["lines"]) <= 3 for result in logs.values())

    unloaded = {"socket": await by_socket("unload", {"model": "a"}), "http": await by_http("/admin/models/b/unload")}
    assert unloaded["socket"].keys() == unloaded["http"].keys() == {"model", "state", "was_running", "exit_code"}
    for edge, model in (("socket", "a"), ("http", "b")):
        assert unloaded[edge]["model"] == model and unloaded[edge]["state"] == "unloaded", edge
        assert unloaded[edge]["was_running"] is True and isinstance(unloaded[edge]["exit_code"], int), edge
    again = {"socket": await by_socket("unload", {"model": "a"}), "http": await by_http("/admin/models/b/unload")}
    assert again["socket"] == {"model": "a", "state": "unloaded", "was_running": False, "exit_code": None}
    assert again["http"] == {"model": "b", "state": "unloaded", "was_running": False, "exit_code": None}

    reset = {"socket": await by_socket("reset", {"model": "a"}), "http": await by_http("/admin/models/b/reset")}
    assert reset["socket"] == {"model": "a", "had_failures": False, "state": "unloaded"}
    assert reset["http"] == {"model": "b", "had_failures": False, "state": "unloaded"}

    rescanned = {"socket": await by_socket("rescan"), "http": await by_http("/admin/rescan")}
    assert rescanned["socket"] == rescanned["http"]  # nothing changed in between
    assert {"added", "removed", "changed", "restarted", "stopped", "kept", "problems"} <= rescanned["http"].keys()


def test_one_serialiser_turns_every_result_into_its_fields() -> None:
    nested = operations.ModelsResult(models=[])
    result = operations.UnloadResult(model="a", state="unloaded", was_running=True, exit_code=0)
    text = json.dumps({"result": result, "nested": nested}, default=operations.json_default)
    assert json.loads(text) == {"result": {"model": "a", "state": "unloaded", "was_running": True, "exit_code": 0},
                                "nested": {"models": []}}
    try:
        json.dumps(object(), default=operations.json_default)
    except TypeError as exc:
        assert "object" in str(exc)
    else:
        raise AssertionError("a value that is not a result was serialised")


def test_key_settings_are_one_class_for_the_store_and_the_control_params() -> None:
    settings = {field.name for field in attrs.fields(KeySettings)}
    assert settings == {"models", "priority_max", "rpm", "concurrent", "expires", "admin"}
    assert issubclass(ApiKey, KeySettings) and issubclass(KeyAddParams, KeySettings)
    assert {field.name for field in attrs.fields(KeyAddParams)} == settings | {"name"}
    params = KeyAddParams(name="ci", rpm=5)
    assert params.settings() == KeySettings(rpm=5) and type(params.settings()) is KeySettings  # the name stays behind
