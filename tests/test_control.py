"""The control socket: JSON-RPC conformance, permissions, concurrency, reload, and routerctl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile

import pytest
import trio
import trio.testing

from routerctl.cli import main as routerctl
from routerd.ops.control import authorize
from tests.conftest import make_config


async def rpc(path: str, *messages: object, raw: bytes | None = None) -> list[dict]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        payload = raw if raw is not None else b"".join(json.dumps(m).encode() + b"\n" for m in messages)
        await stream.send_all(payload)
        buffer = b""
        expected = len(messages) or 1
        replies: list[dict] = []
        with trio.fail_after(10):
            while len(replies) < expected:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buffer += chunk
                while b"\n" in buffer:
                    line, buffer = buffer.split(b"\n", 1)
                    reply = json.loads(line)
                    if "id" in reply or isinstance(reply, list):
                        replies.append(reply)
        return replies


def call(method: str, params: object = None, id: object = 1) -> dict:
    return {"jsonrpc": "2.0", "id": id, "method": method, **({"params": params} if params is not None else {})}


async def test_standard_errors(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    sock = r.daemon.socket_path
    assert (await rpc(sock, raw=b"{nope\n"))[0]["error"]["code"] == -32700
    assert (await rpc(sock, {"id": 1, "method": "ping"}))[0]["error"]["code"] == -32600
    assert (await rpc(sock, call("launch")))[0]["error"]["code"] == -32601
    bad = (await rpc(sock, call("load", {"model": "a", "colour": "red"})))[0]["error"]
    assert bad["code"] == -32602 and "params.colour: unknown key" in bad["message"]
    typed = (await rpc(sock, call("logs", {"model": "a", "lines": "many"})))[0]["error"]
    assert typed["code"] == -32602 and "params.lines" in typed["message"]
    unknown = (await rpc(sock, call("load", {"model": "zzz"})))[0]["error"]
    assert unknown["code"] == -32001 and "not found" in unknown["message"]
    assert (await rpc(sock, call("ping")))[0] == {"jsonrpc": "2.0", "id": 1, "result": "pong"}


async def test_batches_and_notifications(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    replies = (await rpc(r.daemon.socket_path, raw=json.dumps(
        [call("ping", id=1), {"jsonrpc": "2.0", "method": "ping"}, call("nope", id=2), 5]).encode() + b"\n"))[0]
    assert [reply.get("id") for reply in replies] == [1, 2, None]
    assert replies[0]["result"] == "pong" and replies[1]["error"]["code"] == -32601
    assert replies[2]["error"]["code"] == -32600
    assert (await rpc(r.daemon.socket_path, raw=b"[]\n"))[0]["error"]["code"] == -32600


async def test_other_users_are_refused(start_routerd, tmp_path, model_file):
    public = tempfile.mkdtemp(prefix="routerd-test-")  # pytest's tmp dirs are 0700
    os.chmod(public, 0o755)
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}},
                                        control={"socket": f"{public}/control.sock"}))
    os.chmod(r.daemon.socket_path, 0o666)  # let the kernel pass them: routerd itself must refuse
    code = ("import os, socket, json; os.setgid(65534); os.setuid(65534); s = socket.socket(socket.AF_UNIX); "
            f"s.connect({r.daemon.socket_path!r}); "
            "s.sendall(b'{\"jsonrpc\":\"2.0\",\"id\":1,\"method\":\"ping\"}\\n');"
            "print(s.makefile().readline())")
    result = await trio.run_process([sys.executable, "-c", code], capture_stdout=True, check=False)
    reply = json.loads(result.stdout)
    assert reply["error"]["code"] == -32010 and "permission denied" in reply["error"]["message"]
    assert authorize(1000, 1000, own_uid=0, group="") is not None
    assert authorize(0, 0, own_uid=1000, group="") is None


async def test_socket_is_0660_and_a_second_routerd_refuses(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    assert oct(os.stat(r.daemon.socket_path).st_mode & 0o777) == "0o660"
    from routerd.errors import RouterdError
    from routerd.ops.control import ControlServer
    try:
        await ControlServer(r.daemon.operations, r.daemon.socket_path).serve()
    except RouterdError as exc:
        assert "already listening" in exc.message
    else:
        raise AssertionError("a second server started on a live socket")


async def test_twenty_concurrent_clients_and_garbage_do_not_disturb_each_other(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    answers: list[str] = []

    async def good(i: int) -> None:
        answers.append((await rpc(r.daemon.socket_path, call("ping", id=i)))[0]["result"])

    async def rude() -> None:
        stream = await trio.open_unix_socket(r.daemon.socket_path)
        await stream.send_all(b'{"jsonrpc": "2.0", "id": 1, "meth')  # and hang up mid-request
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        for i in range(20):
            nursery.start_soon(good, i)
            nursery.start_soon(rude)
    assert answers == ["pong"] * 20


async def test_reload_restarts_changed_keeps_unchanged_stops_removed(start_routerd, tmp_path, model_file):
    models = {n: {"path": model_file(n), "args": ["--fake-token-delay", "0.1"]} for n in ("same", "changed", "removed")}
    data = make_config(tmp_path, models)
    r = await start_routerd(data)
    for name in models:
        await r.http.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
    pids = {name: r.supervisor.running(name).pid for name in models}
    tokens = 0
    async with r.http.stream("POST", "/v1/completions",
                             json={"model": "changed", "prompt": "x", "stream": True, "max_tokens": 10}) as stream:
        data["models"]["changed"]["args"] = ["--fake-token-delay", "0.05"]
        del data["models"]["removed"]
        r.write_config(data)
        result = (await rpc(r.daemon.socket_path, call("reload")))[0]["result"]
        async for line in stream.aiter_lines():
            tokens += line.startswith("data: {\"choices\": [{\"index\": 0, \"text\"")
    assert tokens == 10  # the in-flight stream on the changed model completed
    assert result["restarted"] == ["changed"] and result["stopped"] == ["removed"] and result["kept"] == ["same"]
    assert r.supervisor.running("same").pid == pids["same"]
    response = await r.http.post("/v1/completions", json={"model": "changed", "prompt": "x", "max_tokens": 1})
    assert response.status_code == 200 and r.supervisor.running("changed").pid != pids["changed"]


async def test_broken_reload_keeps_the_running_config(start_routerd, tmp_path, model_file):
    data = make_config(tmp_path, {"a": {"path": model_file("a")}})
    r = await start_routerd(data)
    r.config_path.write_text("[models.a]\npath = 3\nnope = true\n")
    error = (await rpc(r.daemon.socket_path, call("reload")))[0]["error"]
    assert "models.a.path: expected a string" in error["message"] and "models.a.nope: unknown key" in error["message"]
    assert (await r.http.post("/v1/completions", json={"model": "a", "prompt": "x"})).status_code == 200


async def test_a_rescan_queued_behind_a_reload_keeps_what_the_reload_changed(start_routerd, tmp_path, model_file):
    data = make_config(tmp_path, {"a": {"path": model_file("a")}})
    r = await start_routerd(data)
    data["models"]["b"] = {"path": model_file("b")}
    data.setdefault("scheduler", {})["max_queue"] = 7
    r.write_config(data)
    async with trio.open_nursery() as nursery:
        service = r.daemon.catalog_service
        async with service.lock:  # a rebuild in progress: the reload, then the rescan, wait their turn
            nursery.start_soon(service.reload)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(service.rescan)
            await trio.testing.wait_all_tasks_blocked()
    assert r.daemon.config.scheduler.max_queue == 7  # the rescan did not bring back the old settings
    assert "b" in r.daemon.supervisor.catalog


async def test_routerctl_commands_and_exit_codes(start_routerd, tmp_path, model_file, capsys):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    sock = ["--socket", r.daemon.socket_path]

    async def ctl(*args: str) -> tuple[int, str, str]:
        code = await trio.to_thread.run_sync(routerctl, [*sock, *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    code, out, _ = await ctl("load", "a", "--wait")
    assert code == 0 and "a: ready" in out
    code, out, _ = await ctl("status")
    assert code == 0 and "ready" in out and "MODEL" in out
    code, out, _ = await ctl("--json", "status", "a")
    assert code == 0 and json.loads(out)["model"]["state"] == "ready"
    code, out, _ = await ctl("logs", "a", "-n", "5")
    assert code == 0 and "listening" in out
    code, _, err = await ctl("load", "nope")
    assert code == 1 and "not found" in err
    code, out, _ = await ctl("unload", "a")
    assert code == 0 and "unloaded" in out
    code, _, err = await ctl("--socket", str(tmp_path / "none.sock"), "status")
    assert code == 3 and "none.sock" in err and "routerd serve" in err
    assert subprocess.run([sys.executable, "-m", "routerctl", "frobnicate"], capture_output=True).returncode == 2


@pytest.mark.parametrize("sigint", ["default", "ignored by the shell that started it"])
async def test_ctrl_c_stops_routerctl_logs_follow(start_routerd, tmp_path, model_file, sigint):
    """`routerctl logs -f` ends with 130 on SIGINT, also when started with SIGINT ignored (what a
    shell without job control does to `cmd &`, as when CI itself runs in the background): it
    hung there, waiting on the socket with the signal thrown away."""
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    await r.supervisor.load("a")
    ignore = 'trap "" INT; ' if sigint != "default" else ""
    follower = await trio.lowlevel.open_process(
        ["/bin/sh", "-c", ignore + 'exec "$@"', "sh", sys.executable, "-m", "routerctl",
         "--socket", r.daemon.socket_path, "logs", "a", "-n", "1", "-f"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        with trio.fail_after(20):
            followed = b""
            while b"\n" not in followed:  # following: the last line was shown, it waits for more
                followed += await follower.stdout.receive_some()
            follower.send_signal(signal.SIGINT)
            assert await follower.wait() == 130
        assert b"Traceback" not in await follower.stderr.receive_some()
    finally:
        follower.kill()


async def test_keys_add_takes_the_settings_flat_and_refuses_unknown_or_mistyped_ones(start_routerd, tmp_path,
                                                                                       model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    sock = r.daemon.socket_path
    made = (await rpc(sock, call("keys.add", {"name": "ci", "models": ["a*"], "rpm": 5, "priority_max": "low"})))[0]
    assert made["result"]["name"] == "ci" and made["result"]["key"].startswith(made["result"]["prefix"])
    (row,) = (await rpc(sock, call("keys.list")))[0]["result"]["keys"]
    assert (row["models"], row["rpm"], row["priority_max"], row["concurrent"], row["admin"]) == (["a*"], 5, "low",
                                                                                                 0, False)
    unknown = (await rpc(sock, call("keys.add", {"name": "x", "colour": "red"})))[0]["error"]
    assert unknown["code"] == -32602 and "params.colour: unknown key" in unknown["message"]
    typed = (await rpc(sock, call("keys.add", {"name": "x", "rpm": "many"})))[0]["error"]
    assert typed["code"] == -32602 and "params.rpm" in typed["message"]
    nameless = (await rpc(sock, call("keys.add", {"rpm": 1})))[0]["error"]
    assert nameless["code"] == -32602 and "params.name" in nameless["message"]
    bad = (await rpc(sock, call("keys.add", {"name": "x", "priority_max": "urgent"})))[0]["error"]
    assert "priority_max 'urgent'" in bad["message"] and bad["data"]["code"] == "invalid_key_settings"
    assert [row["name"] for row in (await rpc(sock, call("keys.list")))[0]["result"]["keys"]] == ["ci"]
