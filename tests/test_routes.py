"""The route table: where every method and path goes, that Quart's URL rules agree with it, and
the access check every request passes (routerd/front/routes.py, routerd/front/access.py)."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from werkzeug.exceptions import MethodNotAllowed, NotFound
from werkzeug.routing import Rule

from routerd.config import AuthConfig
from routerd.errors import HeadersTooLarge, Unauthorized
from routerd.events import EventType
from routerd.front import access, api, requested, routes
from routerd.front.routes import Surface

ROOT = Path(__file__).resolve().parent.parent
P, U, V, E, M = Surface.PROXY, Surface.PASSTHROUGH, Surface.VIEWS, Surface.EVENTS, Surface.METRICS
A, UI, OPT, W, NF = Surface.ADMIN, Surface.PAGE, Surface.METHODS, Surface.WRONG_METHOD, Surface.NOT_FOUND
R, RE = Surface.ROUTER, Surface.MODEL_EVENTS

#: (method, path, surface): every kind of route, its edges, and what is not one.
TABLE = [
    # the hot path: POST routes whose body names the model
    ("POST", "/v1/chat/completions", P), ("POST", "/chat/completions", P), ("POST", "/v1/completions", P),
    ("POST", "/v1/embeddings", P), ("POST", "/tokenize", P), ("POST", "/v1/messages/count_tokens", P),
    ("POST", "/v1/responses", P), ("POST", "/infill", P),
    # passthrough to a backend (GET only)
    ("GET", "/upstream/org/repo:Q4_K_M/props", U), ("GET", "/upstream/m/anything/at/all", U),
    ("GET", "/smollm2/health", U), ("GET", "/org/repo/slots", U), ("GET", "/m/props", U), ("GET", "/m/metrics", U),
    ("GET", "/ui/health", U), ("GET", "/admin/models/m/health", U),
    ("HEAD", "/smollm2/health", NF), ("HEAD", "/upstream/m/props", NF), ("GET", "/smollm2/other", NF),
    # the views (GET and HEAD)
    ("GET", "/health", V), ("HEAD", "/health", V), ("GET", "/v1/models", V), ("GET", "/memory", V),
    ("GET", "/v1/models/org/repo:Q4_K_M", V), ("GET", "/v1/models/org/repo/health", V), ("HEAD", "/v1/models/m", V),
    ("GET", "/v1/models/", NF), ("GET", "/health/", NF),
    # observability (GET only: HEAD is not found)
    ("GET", "/metrics", M), ("GET", "/events", E), ("HEAD", "/metrics", NF), ("HEAD", "/events", NF),
    # admin
    ("GET", "/admin/whoami", A), ("HEAD", "/admin/whoami", A), ("GET", "/admin/models/org/repo/logs", A),
    ("POST", "/admin/models/org/repo:Q4/load", A), ("POST", "/admin/models/m/unload", A),
    ("POST", "/admin/models/m/logs", A), ("POST", "/admin/rescan", A),
    ("GET", "/admin/models/m/load", NF), ("GET", "/admin/nothing", NF), ("GET", "/admin/rescan", NF),
    ("GET", "/admin/models//logs", NF), ("POST", "/admin/models/m", W), ("POST", "/admin/whoami", W),
    ("PUT", "/admin/nothing", W),
    # llama.cpp router mode's API
    ("GET", "/props", R), ("HEAD", "/props", R), ("GET", "/models", R), ("POST", "/models/load", R),
    ("POST", "/models/unload", R), ("POST", "/models", R), ("DELETE", "/models", R), ("GET", "/models/sse", RE),
    ("GET", "/models/load", NF), ("PUT", "/models", W), ("POST", "/props", W), ("DELETE", "/models/load", W),
    ("GET", "/models/other", NF),
    # the page
    ("GET", "/ui", UI), ("GET", "/ui/", UI), ("GET", "/ui/app.js", UI), ("HEAD", "/ui/index.html", UI),
    ("GET", "/ui/nope", UI), ("GET", "/ui/a/b", NF), ("POST", "/ui", NF), ("PUT", "/ui/app.js", NF),
    ("GET", "/ui/event-types.js", UI), ("HEAD", "/ui/event-types.js", UI), ("POST", "/ui/event-types.js", NF),
    # wrong methods on known paths: 405
    ("GET", "/v1/chat/completions", W), ("HEAD", "/tokenize", W), ("PUT", "/v1/chat/completions", W),
    ("DELETE", "/v1/chat/completions", W), ("POST", "/v1/models", W), ("POST", "/health", W),
    ("POST", "/metrics", W), ("PATCH", "/events", W), ("POST", "/v1/models/m", W), ("POST", "/upstream/m/props", W),
    ("POST", "/smollm2/health", W),
    # not found
    ("GET", "/", Surface.WEBUI), ("HEAD", "/", Surface.WEBUI),
    ("POST", "/", NF), ("GET", "/v2/whatever", NF), ("POST", "/v1/chat/completion", NF),
    ("PUT", "/v2/whatever", NF), ("GET", "/static/app.js", NF), ("DELETE", "/", NF),
    # OPTIONS without a CORS preflight: Quart's automatic answer everywhere a rule matches
    ("OPTIONS", "/v1/chat/completions", OPT), ("OPTIONS", "/health", OPT), ("OPTIONS", "/", NF),
]


@pytest.mark.parametrize(("method", "path", "surface"), TABLE)
def test_every_method_and_path_goes_to_one_surface(method, path, surface):
    assert routes.route(method, path).surface is surface
    assert routes.is_proxied(method, path) is (surface in (P, U))
    assert routes.is_wrong_method(method, path) is (surface is W)


@pytest.mark.parametrize(("method", "path", "label", "queued"), [
    ("POST", "/v1/chat/completions", "/v1/chat/completions", True), ("POST", "/v1/embeddings", "/v1/embeddings", True),
    ("POST", "/tokenize", "/tokenize", False), ("POST", "/detokenize", "/detokenize", False),
    ("POST", "/apply-template", "/apply-template", False),
    ("POST", "/v1/messages/count_tokens", "/v1/messages/count_tokens", False),
    ("GET", "/upstream/org/repo/props", "/upstream", False), ("GET", "/org/repo:Q4/slots", "/{model}/slots", False),
    ("GET", "/my model/health", "/{model}/health", False),
])
def test_a_proxied_route_says_how_it_is_counted_and_whether_it_waits_for_a_slot(method, path, label, queued):
    found = routes.route(method, path)
    assert (found.label, found.queued) == (label, queued)  # the metrics label is never the client's text


def test_routing_allocates_nothing_per_request():
    """The hot path gets the same Route value every time (made once, at import)."""
    for method, path in [("POST", "/v1/chat/completions"), ("GET", "/m/props"), ("GET", "/nope")]:
        assert routes.route(method, path) is routes.route(method, path)


# -- the table and Quart's URL rules agree ---------------------------------------------------
#: The surface each of the Quart app's endpoints (view functions) serves.
ENDPOINT_SURFACES = {
    "health": V, "list_models": V, "show_model": V, "memory": V, "unrouted": NF,
    "ui_root": UI, "ui_file": UI, "event_types": UI, "whoami": A, "logs": A, "act": A, "rescan_models": A,
    "router_props": R, "router_models": R, "router_load": R, "router_unload": R, "router_pull": R, "router_remove": R,
}
_QUART_SERVED = {V, A, UI, R}


@pytest.fixture(scope="module")
def views() -> Any:
    stub = SimpleNamespace(config=SimpleNamespace(server=SimpleNamespace(max_body_bytes=1000)))
    gate = SimpleNamespace()
    operations = SimpleNamespace(supervisor=stub, gate=gate)  # what admin's routes act through
    return routes.create_app(operations, SimpleNamespace()).views  # type: ignore[arg-type]


def _sample_path(rule: Rule) -> str:
    """A concrete path the rule matches: a model name with a slash and a colon for <path:...>."""
    path = re.sub(r"<path:[^>]+>", "org/repo:Q4_K_M", rule.rule)
    return re.sub(r"<[^>]+>", "load", path)


def test_every_quart_rule_is_claimed_by_the_table_for_the_same_surface(views):
    rules = list(views.url_map.iter_rules())
    assert {rule.endpoint for rule in rules} == set(ENDPOINT_SURFACES), "a rule was added: give it a surface"
    for rule in rules:
        path = _sample_path(rule)
        for method in rule.methods:
            found = routes.route(method, path).surface
            if method == "OPTIONS":
                assert found is OPT, (method, rule.rule)
            elif rule.endpoint == "unrouted":  # the catch-all: whatever the table gives no handler to
                assert found in (NF, W), (method, rule.rule)
            else:
                assert found is ENDPOINT_SURFACES[rule.endpoint], (method, rule.rule, found)


@pytest.mark.parametrize(("method", "path", "surface"), [case for case in TABLE if case[0] != "OPTIONS"])
def test_quart_serves_exactly_what_the_table_gives_it(views, method, path, surface):
    """The other way round: a path the table gives the views, admin or the page is matched by
    that surface's Quart rule, and one it calls 404 or 405 reaches no rule but the catch-all.
    (What it gives the proxy or /metrics and /events never reaches Quart: GET /ui/health is a
    model named "ui", as it always was.)"""
    adapter = views.url_map.bind("localhost")
    try:
        endpoint, _ = adapter.match(path, method)
    except (NotFound, MethodNotAllowed):
        endpoint = None
    if surface in _QUART_SERVED:
        assert endpoint is not None and ENDPOINT_SURFACES[endpoint] is surface
    elif surface in (NF, W):
        assert endpoint in (None, "unrouted")


def test_nothing_imports_the_proxy_but_the_route_table():
    importers = set()
    for source in [*(ROOT / "routerd").rglob("*.py"), *(ROOT / "bench").glob("*.py")]:
        for node in ast.walk(ast.parse(source.read_text(), str(source))):
            if isinstance(node, ast.ImportFrom) and node.module == "routerd.front" and \
                    any(alias.name == "proxy" for alias in node.names) or \
                    isinstance(node, ast.ImportFrom) and node.module == "routerd.front.proxy" or \
                    isinstance(node, ast.Import) and any(alias.name == "routerd.front.proxy" for alias in node.names):
                importers.add(str(source.relative_to(ROOT)))
    assert importers == {"routerd/front/routes.py"}


# -- the page names event types only as routerd defines them -------------------------------------
APP_JS = ROOT / "routerd" / "front" / "ui" / "app.js"
#: A JavaScript string literal ('...', "..." or `...`, escapes included).
_JS_STRING = re.compile(r"""(["'`])((?:\\.|(?!\1)[^\\\n])*)\1""")


async def test_the_page_is_served_the_event_types_as_routerd_defines_them(views):
    response = await views.test_client().get("/ui/event-types.js")
    assert response.status_code == 200 and response.content_type.startswith("text/javascript")
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]  # the page's own headers
    source = await response.get_data(as_text=True)
    served = re.search(r"export const EVENT = Object\.freeze\((\{.*?\})\);", source, re.S)
    snapshot = re.search(r"export const SNAPSHOT = (\"[^\"]*\");", source)
    assert served and snapshot, source
    assert json.loads(served.group(1)) == {member.name: member.value for member in EventType}
    assert json.loads(snapshot.group(1)) == api.SNAPSHOT


def test_the_page_spells_no_event_type_and_uses_only_defined_ones():
    """A renamed type (its value or its member name) cannot silently stop the page matching it:
    each of the page's scripts (app.js, playground.js...) takes every type from
    /ui/event-types.js and names only members that exist."""
    scripts = sorted(path for path in APP_JS.parent.glob("*.js") if path.name != "event-types.js")
    assert {"app.js", "playground.js"} <= {path.name for path in scripts}
    assert 'import { EVENT, SNAPSHOT } from "./event-types.js";' in APP_JS.read_text()
    used: set[str] = set()
    for path in scripts:
        source = path.read_text()
        spelled = {match.group(2) for match in _JS_STRING.finditer(source)}
        assert not spelled & ({member.value for member in EventType} | {api.SNAPSHOT}), path.name
        named = set(re.findall(r"\bEVENT\.(\w+)", source))
        if named:  # from routerd's definition, not a constant of its own
            assert re.search(r'^import \{[^}]*\bEVENT\b[^}]*\} from "\./event-types\.js";$', source, re.M), path.name
        assert named <= set(EventType.__members__), (path.name, named - set(EventType.__members__))
        used |= named
    assert used


def test_the_literal_scan_sees_an_event_type_spelled_out():
    """The scan above can fail: it finds a type written as a literal in each quoting style."""
    for line in ('if (event.type === "model.log") {', "x = 'request';", "`dropped`"):
        assert {match.group(2) for match in _JS_STRING.finditer(line)} & {"model.log", "request", "dropped"}


# -- the access check every request passes ------------------------------------------------------
def _scope(path: str, headers: list[tuple[bytes, bytes]] | None = None) -> Any:
    return {"type": "http", "method": "GET", "path": path, "headers": headers or [], "state": {},
            "client": ("127.0.0.1", 5000)}


@pytest.fixture
def keyed_gate(tmp_path):
    gate = access.Gate(AuthConfig(), listening_on="127.0.0.1", state_dir=str(tmp_path))
    key, _ = gate.add("ann")
    return gate, key


def test_the_check_keeps_the_caller_for_the_handlers_and_refuses_a_missing_key(keyed_gate):
    gate, key = keyed_gate
    scope = _scope("/v1/models", [(b"authorization", b"Bearer " + key.encode())])
    access.check_request(gate, scope, max_headers=10, metrics_open=False)
    assert access.caller_of(scope).name == "ann"
    with pytest.raises(Unauthorized):
        access.check_request(gate, _scope("/v1/models"), max_headers=10, metrics_open=False)


@pytest.mark.parametrize(("path", "metrics_open"), [("/health", False), ("/ui", False), ("/ui/app.js", False),
                                                    ("/metrics", True)])
def test_open_paths_need_no_key_and_their_caller_is_anonymous(keyed_gate, path, metrics_open):
    gate, _ = keyed_gate
    scope = _scope(path)
    access.check_request(gate, scope, max_headers=10, metrics_open=metrics_open)
    assert access.caller_of(scope) is access.ANONYMOUS
    if path == "/metrics":
        with pytest.raises(Unauthorized):  # open only when metrics.open says so
            access.check_request(gate, _scope(path), max_headers=10, metrics_open=False)


def test_too_many_header_fields_are_refused_before_the_key_is_looked_at(keyed_gate):
    gate, _ = keyed_gate
    with pytest.raises(HeadersTooLarge) as refused:
        access.check_request(gate, _scope("/health", [(b"x-h", b"1")] * 11), max_headers=10, metrics_open=False)
    assert refused.value.status == 431 and "server.max_headers" in refused.value.message


# -- what changes state, and router mode's ?model= -------------------------------------------
@pytest.mark.parametrize(("method", "path", "changes"), [
    ("POST", "/models/load", True), ("POST", "/models/unload", True), ("POST", "/models", True),
    ("DELETE", "/models", True), ("POST", "/admin/models/m/load", True), ("POST", "/admin/rescan", True),
    ("GET", "/models", False), ("GET", "/props", False), ("GET", "/admin/whoami", False),
    ("GET", "/admin/models/m/logs", False), ("POST", "/v1/chat/completions", False), ("GET", "/models/sse", False),
])
def test_the_routes_that_change_what_runs_or_is_stored_are_marked(method, path, changes):
    assert routes.route(method, path).changes_state is changes


@pytest.mark.parametrize(("path", "query", "proxied"), [
    ("/props", b"model=smollm2", True), ("/metrics", b"model=org/repo:Q4", True), ("/props", b"", False),
    ("/props", b"model=", False), ("/metrics", b"other=1", False), ("/health", b"model=m", False),
])
def test_props_and_metrics_go_to_the_model_a_query_names(path, query, proxied):
    named = requested.model_in_query(query) is not None
    found = routes.route("GET", path, named)
    assert found.proxied is proxied
    if proxied:
        assert found.label == path + "?model"  # counted by route, never by the client's text
