"""Access control: keys (made, stored, scoped, limited, revoked), the closed backend ports,
CORS and the refusal to serve beyond loopback without keys. Against the fake llama-server;
test_real_llama.py repeats the client-facing parts with the official SDKs and the real one."""

from __future__ import annotations

import datetime as dt
import json
import os
import stat

import httpx
import pytest
import tomli_w
import trio

from routerctl.cli import main as routerctl
from routerd.backends.backend import API_KEY_VARIABLE, child_environment
from routerd.config import AuthConfig
from routerd.errors import EXIT_CONFIG, ConfigError, TooManyRequests, Unauthorized
from routerd.front import keys as keys_mod
from routerd.front.access import ANONYMOUS, Caller, Gate, TokenBucket, cross_site, is_loopback, presented_key
from routerd.front.keys import KeySettings
from routerd.front.requested import forward_headers
from tests.conftest import make_config
from tests.test_hardening import assert_clean_failure, serve

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)


# -- keys, pure ---------------------------------------------------------------------------------
def test_a_new_key_is_random_and_only_its_hash_and_prefix_are_kept():
    key, record = keys_mod.make("ci", now=NOW)
    other, _ = keys_mod.make("ci", now=NOW)
    assert key.startswith("rk-") and len(key) > 40 and key != other
    assert record.hash == keys_mod.hash_key(key) and key not in record.hash
    assert key.startswith(record.prefix) and len(record.prefix) < 12


def test_scope_globs_match_names_and_aliases():
    _, record = keys_mod.make("team", KeySettings(models=("qwen*", "org/*:Q4_K_M")), now=NOW)
    assert record.allows(["qwen2.5-7b"])
    assert record.allows(["llama3", "qwen-alias"])  # through an alias
    assert record.allows(["org/repo:Q4_K_M"]) and not record.allows(["org/repo:Q8_0"])
    assert not record.allows(["gemma3"])


def test_expiry_dates_are_whole_days_in_utc():
    assert keys_mod.expiry("2026-11-22") == dt.datetime(2026, 11, 23, tzinfo=dt.UTC)
    _, record = keys_mod.make("k", KeySettings(expires="2026-11-22"), now=NOW)
    assert not record.expired(NOW) and record.expired(NOW + dt.timedelta(hours=12))
    with pytest.raises(Exception, match="in the past"):
        keys_mod.make("k", KeySettings(expires="2026-11-21"), now=NOW)
    with pytest.raises(Exception, match="not a date"):
        keys_mod.make("k", KeySettings(expires="soon"), now=NOW)


def test_the_key_file_keeps_no_key_and_is_private(tmp_path):
    store = keys_mod.KeyFile(str(tmp_path / "keys.toml"))
    key, record = keys_mod.make("ci", KeySettings(models=("a*",), rpm=5), now=NOW)
    store.save([record])
    text = (tmp_path / "keys.toml").read_text()
    assert key not in text and record.hash in text
    assert stat.S_IMODE(os.stat(tmp_path / "keys.toml").st_mode) == 0o600
    assert store.load() == {"ci": record}


def test_a_key_file_as_routerd_writes_it_loads_and_unset_fields_take_the_settings_defaults(tmp_path):
    digest = "sha256:" + "0" * 64
    path = tmp_path / "keys.toml"
    path.write_text(f'''[keys.ci]
hash = "{digest}"
prefix = "rk-AbC12x"
models = ["a*"]
priority_max = "low"
rpm = 5
admin = true
created = "2026-11-22T12:00:00+00:00"

[keys.bare]
hash = "{digest}"
''')
    loaded = keys_mod.KeyFile(str(path)).load()
    assert loaded["ci"].settings() == KeySettings(models=("a*",), priority_max="low", rpm=5, admin=True)
    assert loaded["bare"].settings() == KeySettings() == keys_mod.make("new", now=NOW)[1].settings()
    path.write_text(f'[keys.odd]\nhash = "{digest}"\npriority_max = "urgent"\nrpm = -1\n')
    with pytest.raises(ConfigError) as caught:  # the same checks as a new key's
        keys_mod.KeyFile(str(path)).load()
    assert "keys.odd: priority_max 'urgent'" in caught.value.message and "must not be negative" in caught.value.message


def test_a_broken_key_file_names_each_problem(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(tomli_w.dumps({"keys": {"a": {"hash": "md5:x"}, "b": {"hash": "sha256:" + "0" * 64, "rpm": "x"},
                                            "c": {"prefix": "rk-"}}}))
    with pytest.raises(ConfigError) as caught:
        keys_mod.KeyFile(str(path)).load()
    text = "\n".join(caught.value.errors)
    assert "keys.a" in text and "sha256" in text and "keys.b" in text and "keys.c.hash: required" in text


def test_a_token_bucket_refills_at_its_rate():
    bucket = TokenBucket(2, now=0.0)
    assert bucket.take(0.0) == 0 and bucket.take(0.0) == 0
    assert bucket.take(0.0) == pytest.approx(30.0)  # one request's worth every 30 s
    assert bucket.take(29.0) == pytest.approx(1.0)
    assert bucket.take(30.0) == 0


def test_keys_are_read_from_both_headers_and_only_as_bearer():
    assert presented_key([(b"authorization", b"Bearer rk-abc")]) == "rk-abc"
    assert presented_key([(b"authorization", b"bearer  rk-abc ")]) == "rk-abc"
    assert presented_key([(b"x-api-key", b"rk-abc")]) == "rk-abc"
    assert presented_key([(b"authorization", b"Basic dXNlcg==")]) is None
    assert presented_key([]) is None


def test_loopback_is_only_this_machine():
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("192.168.1.5")
    assert not is_loopback("myhost.lan")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def gate(tmp_path, host: str = "127.0.0.1", **auth) -> tuple[Gate, Clock]:
    clock = Clock()
    return Gate(AuthConfig(**auth), listening_on=host, state_dir=str(tmp_path), clock=clock,
                wallclock=lambda: NOW), clock


def bearer(key: str) -> list[tuple[bytes, bytes]]:
    return [(b"authorization", b"Bearer " + key.encode())]


def test_keys_are_required_once_one_exists_and_a_revoked_one_fails_at_once(tmp_path):
    g, _ = gate(tmp_path)
    assert not g.required and g.authenticate([]).key is None
    key, _ = g.add("ci")
    assert g.required
    with pytest.raises(Unauthorized):
        g.authenticate([])
    with pytest.raises(Unauthorized):
        g.authenticate(bearer(key + "x"))
    assert g.authenticate(bearer(key)).name == "ci"
    g.revoke("ci")
    assert not g.required  # loopback, no key left: open again, as before the first key
    assert Gate(AuthConfig(), listening_on="127.0.0.1", state_dir=str(tmp_path)).listing() == []


def test_an_expired_key_is_refused_with_its_own_code(tmp_path):
    g, _ = gate(tmp_path)
    key, _ = g.add("old", KeySettings(expires="2026-11-22"))
    assert g.authenticate(bearer(key)).name == "old"
    g._wallclock = lambda: NOW + dt.timedelta(days=1)
    with pytest.raises(Unauthorized) as caught:
        g.authenticate(bearer(key))
    assert caught.value.code == "expired_api_key"


def test_rate_and_concurrency_limits_are_per_key(tmp_path):
    g, clock = gate(tmp_path)
    key, _ = g.add("slow", KeySettings(rpm=2, concurrent=1))
    other, _ = g.add("free")
    slow, free = g.authenticate(bearer(key)), g.authenticate(bearer(other))
    with g.admit(slow):
        with pytest.raises(TooManyRequests) as busy:
            with g.admit(slow):
                pass
        assert busy.value.code == "key_concurrency_limit"
        with g.admit(free), g.admit(free):  # another key is not limited by this one
            pass
    with g.admit(slow):
        pass
    with pytest.raises(TooManyRequests) as over:
        with g.admit(slow):
            pass
    assert over.value.code == "key_rate_limit" and over.value.retry_after == pytest.approx(30.0)
    clock.now += 30
    with g.admit(slow):
        pass


def test_priority_is_capped_by_the_key():
    _, capped = keys_mod.make("bulk", KeySettings(priority_max="low"), now=NOW)
    assert Caller(capped).priority(0) == 2 and Caller(capped).priority(2) == 2
    assert Caller().priority(0) == 0


def test_beyond_loopback_without_keys_is_refused_unless_allowed(tmp_path):
    with pytest.raises(ConfigError, match="allow_unauthenticated"):
        gate(tmp_path, host="0.0.0.0")
    open_gate, _ = gate(tmp_path, host="0.0.0.0", allow_unauthenticated=True)
    assert not open_gate.required
    keyed, _ = gate(tmp_path / "keyed", host="127.0.0.1")
    keyed.add("ci")
    exposed, _ = gate(tmp_path / "keyed", host="0.0.0.0")
    exposed.revoke("ci")
    assert exposed.required  # the last key revoked: still closed to everyone, never open


def test_a_keys_file_from_other_tools_is_read_and_followed(tmp_path):
    external = tmp_path / "ext.toml"
    key = keys_mod.new_key()
    external.write_text(tomli_w.dumps({"keys": {"ops": {"hash": keys_mod.hash_key(key), "models": ["a"]}}}))
    g, clock = gate(tmp_path / "state", keys_file=str(external))
    assert g.authenticate(bearer(key)).key.models == ("a",)
    second = keys_mod.new_key()
    external.write_text(tomli_w.dumps({"keys": {"ops2": {"hash": keys_mod.hash_key(second)}}}))
    clock.now += 2  # looked at again at most once a second
    assert g.authenticate(bearer(second)).name == "ops2"
    with pytest.raises(Unauthorized):
        g.authenticate(bearer(key))
    external.write_text("not toml [")
    clock.now += 2
    assert g.authenticate(bearer(second)).name == "ops2"  # a broken edit keeps the keys in force


def test_children_get_their_key_and_no_secrets():
    inherited = {"PATH": "/usr/bin", "HF_TOKEN": "hf_secret", "NOTIFY_SOCKET": "/run/notify",
                 "AWS_SECRET_ACCESS_KEY": "x", "CUDA_VISIBLE_DEVICES": "0", "GGML_CUDA_NO_PINNED": "1",
                 "LD_LIBRARY_PATH": "/opt/cuda", "LC_ALL": "C.UTF-8", "HSA_OVERRIDE_GFX_VERSION": "11.0.0",
                 API_KEY_VARIABLE: "from-outside"}
    env = child_environment(inherited, {"OMP_NUM_THREADS": "4", API_KEY_VARIABLE: "nope"}, "child-key")
    assert env[API_KEY_VARIABLE] == "child-key"
    for kept in ("PATH", "CUDA_VISIBLE_DEVICES", "GGML_CUDA_NO_PINNED", "LD_LIBRARY_PATH", "LC_ALL",
                 "HSA_OVERRIDE_GFX_VERSION", "OMP_NUM_THREADS"):
        assert kept in env
    for secret in ("HF_TOKEN", "NOTIFY_SOCKET", "AWS_SECRET_ACCESS_KEY"):
        assert secret not in env


def test_credentials_and_cors_headers_are_never_passed_on():
    headers = [(b"authorization", b"Bearer rk-x"), (b"x-api-key", b"rk-x"), (b"content-type", b"application/json"),
               (b"access-control-allow-origin", b"*"), (b"x-request-priority", b"high")]
    assert forward_headers(headers) == [(b"content-type", b"application/json"), (b"x-request-priority", b"high")]


# -- end to end, fake llama-server --------------------------------------------------------------
def ctl(r, *args: str, capsys) -> tuple[int, str, str]:
    status = routerctl(["--socket", r.daemon.socket_path, *args])
    out, err = capsys.readouterr()
    return status, out, err


async def run_ctl(r, *args: str, capsys) -> tuple[int, str, str]:
    return await trio.to_thread.run_sync(lambda: ctl(r, *args, capsys=capsys))


def chat(model: str) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models"])
async def test_a_refused_request_whose_body_comes_late_leaves_its_connection_usable(start_routerd, tmp_path,
                                                                                    model_file, path):
    """A keep-alive client sends a request's head, then its body, then its next request: the
    refusal waits for the body, so the next request on the connection is answered (answering
    first and then closing under the client failed its next request: a CI flake)."""
    r = await start_routerd(make_config(tmp_path, {"alpha": {"path": model_file("alpha")}}))
    r.daemon.operations.add_key("k", KeySettings())
    host, port = r.url.removeprefix("http://").rsplit(":", 1)
    body = json.dumps(chat("alpha")).encode()
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        head = b"POST %s HTTP/1.1\r\nhost: x\r\nauthorization: Bearer rk-wrong\r\ncontent-length: %d\r\n\r\n"
        await stream.send_all(head % (path.encode(), len(body)))
        await trio.sleep(0.3)
        await stream.send_all(body + b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        with trio.fail_after(5):
            while received.count(b"HTTP/1.1 ") < 2 or not received.endswith(b"}"):
                chunk = await stream.receive_some(65536)
                assert chunk, f"closed after the refusal, before the next answer: {received!r}"
                received += chunk
    refusal_head, rest = received.split(b"\r\n\r\n", 1)
    length = int(next(line for line in refusal_head.split(b"\r\n") if line.lower().startswith(b"content-length"))
                 .split(b":")[1])
    assert refusal_head.startswith(b"HTTP/1.1 401") and b"connection: close" not in refusal_head.lower()
    assert b"invalid_api_key" in rest[:length]
    assert rest[length:].startswith(b"HTTP/1.1 200"), "the next answer does not follow the refusal's body"


async def test_keys_made_with_routerctl_gate_every_route_but_health(start_routerd, tmp_path, model_file, capsys):
    r = await start_routerd(make_config(tmp_path, {"alpha": {"path": model_file("alpha")},
                                                   "beta": {"path": model_file("beta"), "aliases": ["b"]}}))
    assert (await r.http.post("/v1/chat/completions", json=chat("alpha"))).status_code == 200  # no key yet: open
    status, out, _ = await run_ctl(r, "keys", "add", "all", capsys=capsys)
    assert status == 0
    key = next(word for word in out.split() if word.startswith("rk-"))
    status, out, _ = await run_ctl(r, "keys", "add", "beta-only", "--models", "b", "--json", capsys=capsys)
    scoped = json.loads(out)["key"]

    refused = await r.http.post("/v1/chat/completions", json=chat("alpha"))
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert refused.json()["error"]["type"] == "invalid_request_error" and refused.headers["www-authenticate"]
    wrong = await r.http.get("/v1/models", headers={"Authorization": "Bearer rk-wrong"})
    assert wrong.status_code == 401 and "not valid" in wrong.json()["error"]["message"]
    assert (await r.http.get("/health")).status_code == 200
    assert (await r.http.get("/no/such/route")).status_code == 401  # nothing is revealed without a key

    ok = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200
    anthropic_style = await r.http.post("/v1/chat/completions", json=chat("beta"), headers={"x-api-key": scoped})
    assert anthropic_style.status_code == 200

    listed = (await r.http.get("/v1/models", headers={"x-api-key": scoped})).json()
    assert sorted(m["id"] for m in listed["data"]) == ["b", "beta"]
    hidden = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers={"x-api-key": scoped})
    missing = await r.http.post("/v1/chat/completions", json=chat("gamma"), headers={"x-api-key": scoped})
    assert hidden.status_code == missing.status_code == 404
    assert hidden.json()["error"]["message"] == "model 'alpha' not found"  # the same words as for no such model
    assert "alpha" not in missing.text
    assert (await r.http.get("/v1/models/alpha", headers={"x-api-key": scoped})).status_code == 404
    assert (await r.http.get("/upstream/alpha/props", headers={"x-api-key": scoped})).status_code == 404
    assert (await r.http.get("/memory", headers={"x-api-key": scoped})).status_code == 403

    status, out, _ = await run_ctl(r, "keys", "list", capsys=capsys)
    assert status == 0 and "beta-only" in out and key not in out and scoped not in out
    assert "keys are required" in out
    status, out, _ = await run_ctl(r, "keys", "revoke", "all", capsys=capsys)
    assert status == 0 and "revoked" in out
    gone = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers={"Authorization": f"Bearer {key}"})
    assert gone.status_code == 401
    stored = (tmp_path / "state" / "keys.toml").read_text()
    assert scoped not in stored and "beta-only" in stored


async def test_routerctl_keys_errors_say_what_to_do(start_routerd, tmp_path, model_file, capsys):
    r = await start_routerd(make_config(tmp_path, {"alpha": {"path": model_file("alpha")}}))
    assert (await run_ctl(r, "keys", "add", "ci", capsys=capsys))[0] == 0
    status, _, err = await run_ctl(r, "keys", "add", "ci", capsys=capsys)
    assert status != 0 and "exists" in err and "revoke it first" in err
    status, _, err = await run_ctl(r, "keys", "revoke", "nobody", capsys=capsys)
    assert status != 0 and "keys list" in err
    status, _, err = await run_ctl(r, "keys", "add", "bad name", capsys=capsys)
    assert status != 0 and "letters, digits" in err
    status, _, err = await run_ctl(r, "keys", "add", "late", "--expires", "2020-01-01", capsys=capsys)
    assert status != 0 and "in the past" in err


async def test_key_limits_answer_429_with_retry_after(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"alpha": {"path": model_file("alpha"),
                                                             "args": ["--fake-token-delay", "0.2"]}}))
    key, _ = r.daemon.gate.add("one-at-a-time", KeySettings(concurrent=1, rpm=2))
    headers = {"Authorization": f"Bearer {key}"}
    async with r.http.stream("POST", "/v1/chat/completions", json={**chat("alpha"), "stream": True,
                                                                     "max_tokens": 8}, headers=headers) as first:
        lines = first.aiter_lines()
        await lines.__anext__()
        second = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers=headers)
        assert second.status_code == 429 and second.json()["error"]["code"] == "key_concurrency_limit"
        assert int(second.headers["retry-after"]) >= 1
        async for _ in lines:
            pass
    assert (await r.http.post("/v1/chat/completions", json=chat("alpha"), headers=headers)).status_code == 200
    over = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers=headers)
    assert over.status_code == 429 and over.json()["error"]["code"] == "key_rate_limit"
    assert 1 <= int(over.headers["retry-after"]) <= 30  # a token every 30 s


async def test_a_backend_answers_only_routerd(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"alpha": {"path": model_file("alpha")}}))
    assert (await r.http.post("/v1/chat/completions", json=chat("alpha"))).status_code == 200
    backend = r.supervisor.running("alpha")
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{backend.port}", trust_env=False) as direct:
        straight = await direct.post("/v1/chat/completions", json=chat("alpha"))
        assert straight.status_code == 401
        assert (await direct.get("/slots")).status_code == 401
    with open(f"/proc/{backend.pid}/cmdline", "rb") as f:
        argv = f.read()
    with open(f"/proc/{backend.pid}/environ", "rb") as f:
        environ = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
    assert environ[API_KEY_VARIABLE.encode()] not in argv  # the key is not in the world-readable argv
    assert b"HF_HUB_CACHE" not in environ  # routerd's own settings stay with routerd
    assert (await r.http.get("/upstream/alpha/slots")).status_code == 200  # routerd sends the key


async def test_cors_headers_only_for_listed_origins(start_routerd, tmp_path, model_file):
    data = make_config(tmp_path, {"alpha": {"path": model_file("alpha")}},
                       server={"cors_origins": ["https://chat.example.org"]})
    r = await start_routerd(data)
    preflight = {"Origin": "https://chat.example.org", "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    allowed = await r.http.options("/v1/chat/completions", headers=preflight)
    assert allowed.status_code == 204
    assert allowed.headers["access-control-allow-origin"] == "https://chat.example.org"
    assert "authorization" in allowed.headers["access-control-allow-headers"]
    stranger = await r.http.options("/v1/chat/completions", headers={**preflight, "Origin": "https://evil.example"})
    assert not any(h.startswith("access-control-") for h in stranger.headers)
    answer = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers={"Origin": "https://chat.example.org"})
    assert answer.headers["access-control-allow-origin"] == "https://chat.example.org"
    other = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers={"Origin": "https://evil.example"})
    assert other.status_code == 200 and not any(h.startswith("access-control-") for h in other.headers)


async def test_no_cors_headers_unless_configured(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"alpha": {"path": model_file("alpha")}}))
    answer = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers={"Origin": "https://a.example"})
    assert answer.status_code == 200 and not any(h.startswith("access-control-") for h in answer.headers)
    models = await r.http.get("/v1/models", headers={"Origin": "https://a.example"})
    assert not any(h.startswith("access-control-") for h in models.headers)


async def test_a_broken_keys_file_on_reload_keeps_the_running_config(start_routerd, tmp_path, model_file):
    data = make_config(tmp_path, {"alpha": {"path": model_file("alpha")}})
    r = await start_routerd(data)
    key, _ = r.daemon.gate.add("ci")
    (tmp_path / "broken.toml").write_text("[keys.x]\nhash = 'nope'\n")
    data["auth"] = {"keys_file": str(tmp_path / "broken.toml")}
    r.write_config(data)
    with pytest.raises(ConfigError, match="sha256"):
        await r.daemon.catalog_service.reload()
    assert r.daemon.config.auth.keys_file == ""
    ok = await r.http.post("/v1/chat/completions", json=chat("alpha"), headers={"Authorization": f"Bearer {key}"})
    assert ok.status_code == 200


def test_serving_beyond_loopback_without_keys_refuses_to_start(tmp_path, model_file):
    data = make_config(tmp_path, {}, server={"host": "0.0.0.0"})
    assert_clean_failure(serve(tmp_path, data), EXIT_CONFIG, "auth.allow_unauthenticated = true", "routerctl keys add")


def test_routerd_add_key_makes_a_first_key_before_the_daemon_runs(tmp_path):
    """A server that listens beyond loopback refuses to start without a key; `routerd add-key`
    makes one offline, in the store the daemon reads."""
    import subprocess
    import sys

    from routerd.config import AuthConfig
    from routerd.front.access import Gate

    env = {**os.environ, "STATE_DIRECTORY": str(tmp_path / "state")}
    made = subprocess.run([sys.executable, "-m", "routerd", "add-key", "first", "--admin"], env=env,
                          capture_output=True, text=True, timeout=30)
    assert made.returncode == 0 and "shown this once" in made.stderr
    key = made.stdout.strip()
    again = subprocess.run([sys.executable, "-m", "routerd", "add-key", "first"], env=env,
                           capture_output=True, text=True, timeout=30)
    assert again.returncode == 1 and "exists" in again.stderr and not again.stdout
    gate = Gate(AuthConfig(), listening_on="0.0.0.0", state_dir=str(tmp_path / "state"))  # starts: a key exists
    caller = gate.authenticate([(b"authorization", b"Bearer " + key.encode())])
    assert caller.name == "first" and caller.is_admin


# -- cross-site browser requests, and the local user ---------------------------------------------
@pytest.mark.parametrize(("headers", "refused"), [
    ([], False),  # curl, SDKs: no browser headers; the key is their check
    ([(b"host", b"127.0.0.1:8082"), (b"origin", b"http://127.0.0.1:8082"), (b"sec-fetch-site", b"same-origin")], False),
    ([(b"host", b"localhost:8082"), (b"sec-fetch-site", b"none")], False),  # typed by the user
    ([(b"host", b"Routerd.Example"), (b"origin", b"https://routerd.example")], False),  # names compare case-blind
    ([(b"host", b"127.0.0.1:8082"), (b"origin", b"http://evil.example")], True),
    ([(b"host", b"127.0.0.1:8082"), (b"origin", b"http://127.0.0.1:3000")], True),  # another port, another site
    ([(b"host", b"127.0.0.1:8082"), (b"origin", b"null")], True),  # a sandboxed frame, a file: page
    ([(b"host", b"127.0.0.1:8082"), (b"sec-fetch-site", b"cross-site")], True),
    ([(b"host", b"127.0.0.1:8082"), (b"sec-fetch-site", b"same-site")], True),
    ([(b"origin", b"http://127.0.0.1:8082")], True),  # no Host to compare with
])
def test_a_request_from_another_sites_page_is_told_apart(headers, refused):
    assert (cross_site(headers) is not None) is refused


@pytest.mark.parametrize(("listening", "host", "local"), [
    ("127.0.0.1", b"127.0.0.1:8082", True), ("127.0.0.1", b"localhost", True), ("::1", b"[::1]:8082", True),
    ("127.0.0.1", b"attacker.example:8082", False),  # a name rebound to 127.0.0.1
    ("127.0.0.1", b"", False), ("0.0.0.0", b"127.0.0.1:8082", False),  # reachable from elsewhere
    ("127.0.0.1", b"127.0.0.1:8082 via proxy", False),  # a reverse proxy's callers may be anyone
])
def test_the_local_user_is_one_on_loopback_with_no_key_made(tmp_path, listening, host, local):
    g, _ = gate(tmp_path, listening, allow_unauthenticated=True)
    proxied = host.endswith(b" via proxy")
    host = host.removesuffix(b" via proxy")
    headers = ([(b"host", host)] if host else []) + ([(b"x-forwarded-for", b"203.0.113.9")] if proxied else [])
    assert g.local_user(headers) is local
    if local:
        g.require_admin_key(ANONYMOUS, "POST /models/load", headers)  # acts without a key
        g.add("ops", KeySettings(admin=True))
        assert not g.local_user(headers)  # a key exists: keys are required, for everyone
    with pytest.raises(Unauthorized):
        g.require_admin_key(ANONYMOUS, "POST /models/load", headers)
