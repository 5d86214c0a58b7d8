// routerd's status page: one event stream per page; every view is re-read when an event says
// something changed. No framework, no build step. The playground (playground.js) is a part of
// the page of its own: it imports what it shares from here (the page's state and key, the
// event stream's parser, element()) and follows the listings and the events (follow()); this
// module imports nothing of it.

// The event types as routerd defines them (made from routerd.events.EventType): the page names
// a type only through EVENT, so a renamed type cannot silently go unmatched here.
import { EVENT, SNAPSHOT } from "./event-types.js";

const KEY_STORAGE = "routerd-key";
const MAX_LOG_LINES = 1000;
export const $ = (id) => document.getElementById(id);

export const page = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  admin: false,
  models: [],          // the real models, from /v1/models
  selectors: [],       // the virtual models, from /v1/models
  memory: null,
  logModel: "",
  paused: false,
  held: { backend: [], requests: [] },
  stream: null,        // the AbortController of the event stream
  retryDelay: 1000,
  refreshQueued: false,
  refreshMemory: false,
};

// Other parts of the page (the playground): { listed(), event(event) }, either optional.
const followers = [];

// Follow each listing of the models (page.models, page.selectors: re-read after events) and each
// event of the page's stream. A follower sees the listing as it is now at once: it may come after
// the first one.
export function follow(follower) {
  followers.push(follower);
  if (follower.listed) follower.listed();
}

export function element(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

export function headers() {
  return page.key ? { Authorization: `Bearer ${page.key}` } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const error = new Error(body.error ? body.error.message : `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

// -- the event stream ------------------------------------------------------------------------
// The messages of a server-sent event stream, as they arrive: { data } for each event (its data
// lines joined), { comment } for each comment line (routerd's ": waiting for MODEL" while a
// streamed chat waits for its model). Ids and event names are not used by the page.
export async function* sseMessages(body) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      const lines = buffer.split("\n");
      buffer = lines.pop(); // an incomplete line waits for the rest
      for (const raw of lines) {
        const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
        if (line === "") {
          if (data.length) yield { data: data.join("\n") };
          data = [];
        } else if (line.startsWith(":")) {
          yield { comment: line.slice(1).trim() };
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
  } finally {
    reader.cancel().catch(() => {}); // a reader that stops early lets the connection go
  }
}

async function* serverSentEvents(url, signal) {
  const response = await fetch(url, { headers: headers(), signal });
  if (!response.ok) {
    const error = new Error(`${response.status}`);
    error.status = response.status;
    throw error;
  }
  for await (const message of sseMessages(response.body)) {
    if (message.data) yield JSON.parse(message.data);
  }
}

function setConnection(state, text) {
  const element = $("connection");
  element.dataset.state = state;
  element.textContent = text;
}

async function connect() {
  if (page.stream) page.stream.abort();
  const controller = new AbortController();
  page.stream = controller;
  const query = new URLSearchParams({ requests: "1" });
  if (page.logModel) query.set("logs", page.logModel);
  setConnection("connecting", "connecting…");
  try {
    for await (const event of serverSentEvents(`/events?${query}`, controller.signal)) {
      if (event.type === SNAPSHOT) {
        page.retryDelay = 1000;
        setConnection("live", "live");
        $("request-log").textContent = "";
        writeLines("requests", event.requests.map(requestLine));
        refresh();
      } else {
        onEvent(event);
      }
    }
    throw new Error("the stream ended");
  } catch (error) {
    if (controller.signal.aborted) return; // replaced by a newer connection
    if (error.status === 401 || error.status === 403) {
      setConnection("refused", "a key is needed to see this routerd: enter one above");
      return; // retried when a key is entered
    }
    const seconds = Math.round(page.retryDelay / 1000);
    setConnection("retrying", `disconnected, retrying in ${seconds} s`);
    setTimeout(connect, page.retryDelay);
    page.retryDelay = Math.min(page.retryDelay * 2, 15000);
  }
}

function onEvent(event) {
  for (const follower of followers) if (follower.event) follower.event(event);
  if (event.type === EVENT.REQUEST) {
    appendLog("requests", requestLine(event));
  } else if (event.type === EVENT.MODEL_LOG || event.type === EVENT.MODEL_PROGRESS) {
    if (event.model === page.logModel) appendLog("backend", event.line);
  } else if (event.type === EVENT.DROPPED) {
    connect();
  }
  // A finished request changes counts and "last used": worth a look at the models, at most
  // every 2 s however busy routerd is. A state change is shown at once, memory included.
  if (event.type === EVENT.REQUEST) scheduleRefresh(2000, false);
  else if (event.type !== EVENT.MODEL_LOG) scheduleRefresh(200, true);
}

function scheduleRefresh(delay = 200, withMemory = true) {
  // Several events arrive together (loading, progress, ready): read the views once for them.
  page.refreshMemory = page.refreshMemory || withMemory;
  if (page.refreshQueued) return;
  page.refreshQueued = true;
  setTimeout(() => {
    page.refreshQueued = false;
    const memory = page.refreshMemory;
    page.refreshMemory = false;
    refresh(memory);
  }, delay);
}

// -- views -----------------------------------------------------------------------------------
async function refresh(withMemory = true) {
  try {
    const listing = await api("/v1/models");
    page.models = listing.data.filter((m) => !m.alias_of && !m.selector);
    page.selectors = listing.data.filter((m) => m.selector);
    $("models-error").hidden = true;
  } catch (error) {
    $("models-error").textContent = `Cannot list models: ${error.message}`;
    $("models-error").hidden = false;
    page.models = [];
    page.selectors = [];
  }
  if (withMemory) {
    try {
      page.memory = await api("/memory");
      $("memory-note").hidden = true;
    } catch (error) {
      page.memory = null;
      $("memory-note").textContent = `No memory view: ${error.message}.`;
      $("memory-note").hidden = false;
    }
  }
  renderModels();
  renderMemory();
  renderChoices();
  for (const follower of followers) if (follower.listed) follower.listed();
}

const GIB = 1024 ** 3;
function size(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  return bytes >= GIB ? `${(bytes / GIB).toFixed(1)} GiB` : `${Math.round(bytes / 1024 ** 2)} MiB`;
}
// A file's size, to a tenth: "47.9 MiB".
function fileSize(bytes) {
  if (bytes < 1024 ** 2) return `${Math.round(bytes / 1024)} KiB`;
  return bytes >= GIB ? `${(bytes / GIB).toFixed(1)} GiB` : `${(bytes / 1024 ** 2).toFixed(1)} MiB`;
}
function total(perDevice) {
  return perDevice ? Object.values(perDevice).reduce((a, b) => a + b, 0) : null;
}
function ago(timestamp) {
  if (!timestamp) return "never";
  const seconds = Math.max(0, Date.now() / 1000 - timestamp);
  if (seconds < 60) return `${Math.round(seconds)} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  return `${Math.round(seconds / 3600)} h ago`;
}
function clock(secondsFromNow) {
  if (secondsFromNow === null || secondsFromNow === undefined) return "–";
  const at = new Date(Date.now() + secondsFromNow * 1000);
  return `at ${at.toLocaleTimeString()}`;
}

function cell(row, label, text, className) {
  const td = document.createElement("td");
  td.dataset.label = label;
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function renderModels() {
  $("models").classList.toggle("no-actions", !page.admin);
  const tbody = $("models").querySelector("tbody");
  const rows = [];
  for (const model of page.models) {
    const row = document.createElement("tr");
    row.dataset.model = model.name;
    const name = cell(row, "Model", model.name);
    if (model.aliases.length) {
      const aliases = document.createElement("div");
      aliases.className = "aliases";
      aliases.textContent = model.aliases.join(", ");
      name.appendChild(aliases);
    }
    const state = cell(row, "State", model.state, `state state-${model.state}`);
    const endpoints = model.endpoints || [];
    if (endpoints.length > 1 || endpoints.some((e) => e.kind === "remote")) {
      // A pool: each replica and remote with its load, e.g. "m#2 ready 1/4".
      const pool = document.createElement("div");
      pool.className = "aliases";
      pool.textContent = endpoints.map((e) => `${e.endpoint} ${e.state} ${e.in_flight}/${e.slots}`).join(", ");
      state.appendChild(pool);
    }
    cell(row, "Source", model.source);
    const meta = model.metadata || {};
    cell(row, "Size", [meta.size_label, meta.quantization, size(meta.file_size)].filter(Boolean).join(" · "));
    const memory = model.memory || {};
    cell(row, "Memory", `${size(total(memory.estimate))} / ${size(total(memory.measured))}`, "num");
    const placed = page.memory ? (page.memory.models.find((m) => m.model === model.name) || {}).device : "";
    cell(row, "Device", placed || "–");
    buildCell(row, model.build);
    cell(row, "In flight", String(model.in_flight), "num");
    cell(row, "Queued", String(model.queued), "num");
    cell(row, "Last used", ago(model.last_used));
    cell(row, "Idle stop", model.idle_ttl_left === null ? "–" : clock(model.idle_ttl_left));
    savedCell(row, model.saved_slots);
    cell(row, "Last error", model.last_error || "", "error");
    const actions = cell(row, "Actions", "", "actions");
    if (page.admin && !model.source.startsWith("remote:")) {  // a remote's models are its own to load
      const running = ["starting", "ready", "stopping"].includes(model.state);
      if (!running) actions.appendChild(actionButton("Load", model.name, "load"));
      if (running) actions.appendChild(actionButton("Unload", model.name, "unload"));
      if (model.state === "failed" || model.last_error) actions.appendChild(actionButton("Reset", model.name, "reset"));
    }
    rows.push(row);
  }
  tbody.replaceChildren(...rows);
}

// Which llama-server runs the model (each model may have a binary of its own): its version, its
// file and the Python package it came in if any (builds made without git metadata all say
// "build 0"), and routerd's features turned off because it lacks their flags. Unknown until
// routerd asked the binary: "–".
function buildCell(row, build) {
  const td = cell(row, "llama-server", build ? build.version : "–", "build");
  if (!build) return;
  const name = build.path.split("/").pop();
  const file = element("div", "aliases", build.package ? `${name} · ${build.package}` : name);
  file.title = build.path;
  td.appendChild(file);
  if (build.turned_off && build.turned_off.length) {
    // "this build lacks --metrics, --slot-save-path: those features are off", a flag never
    // broken across lines.
    const warning = element("div", "build-warning", "this build lacks ");
    build.turned_off.forEach((flag, i) => warning.append(...(i ? [", "] : []), element("span", "flag", flag)));
    warning.append(": those features are off");
    td.appendChild(warning);
  }
}

// The conversations (llama-server's slots) saved when the model last stopped, restored when it
// starts again: "2 saved conversations · 2,179 tokens · 47.9 MiB · saved 3 min ago".
function savedCell(row, saved) {
  if (!saved || !saved.slots) {
    cell(row, "Saved conversations", "–", "saved");
    return;
  }
  const conversations = `${saved.slots} saved conversation${saved.slots === 1 ? "" : "s"}`;
  const td = cell(row, "Saved conversations", [conversations, `${saved.tokens.toLocaleString()} tokens`,
                                               fileSize(saved.bytes), `saved ${ago(saved.saved_at)}`].join(" · "),
                  "saved");
  td.title = `saved ${new Date(saved.saved_at * 1000).toLocaleString()}; restored when the model starts again`;
}

function actionButton(text, model, action) {
  const button = document.createElement("button");
  button.type = "button";
  button.textContent = text;
  button.dataset.action = action;
  button.setAttribute("aria-label", `${text} ${model}`);
  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      await api(`/admin/models/${encodeURIComponent(model)}/${action}`, { method: "POST" });
    } catch (error) {
      $("models-error").textContent = `${text} ${model}: ${error.message}`;
      $("models-error").hidden = false;
    } finally {
      button.disabled = false;
      scheduleRefresh();
    }
  });
  return button;
}

function renderMemory() {
  const devices = $("devices");
  if (!page.memory) {
    devices.replaceChildren();
    return;
  }
  const blocks = [];
  for (const device of page.memory.devices) {
    const block = document.createElement("div");
    block.className = "device";
    const label = document.createElement("div");
    label.className = "label";
    const title = document.createElement("strong");
    title.textContent = `${device.device} (${device.description})`;
    const figures = document.createElement("span");
    figures.textContent = `budget ${size(device.budget)} · used ${size(device.used)} · free ${size(device.free)}`;
    label.append(title, figures);
    const bar = document.createElement("div");
    bar.className = "bar";
    bar.setAttribute("role", "img");
    const parts = [];
    for (const model of page.memory.models) {
      const used = model.state !== "unloaded" && model.state !== "failed" && model.measured
        ? Math.max(model.measured[device.device] || 0, (model.estimate || {})[device.device] || 0) : 0;
      if (!used) continue;
      const span = document.createElement("span");
      span.style.width = `${(100 * used) / device.budget}%`;
      span.textContent = `${model.model} ${size(used)}`;
      span.title = span.textContent;
      bar.appendChild(span);
      parts.push(span.textContent);
    }
    const free = document.createElement("span");
    free.className = "free";
    free.style.flex = "1";
    free.textContent = `free ${size(device.free)}`;
    bar.appendChild(free);
    bar.setAttribute("aria-label", `${device.device}: ${parts.join(", ") || "nothing loaded"}, free ${size(device.free)}`);
    block.append(label, bar);
    blocks.push(block);
  }
  devices.replaceChildren(...blocks);
  renderPlan();
}

function renderChoices() {
  for (const [id, wanted] of [["plan-model", (m) => m.state === "unloaded" || m.state === "failed"],
                              ["log-model", () => true]]) {
    const select = $(id);
    const chosen = select.value;
    const options = [select.options[0]];
    for (const model of page.models.filter(wanted)) {
      const option = document.createElement("option");
      option.value = option.textContent = model.name;
      options.push(option);
    }
    select.replaceChildren(...options);
    select.value = options.some((o) => o.value === chosen) ? chosen : "";
  }
}

function renderPlan() {
  const name = $("plan-model").value;
  const out = $("plan");
  if (!name || !page.memory) {
    out.textContent = "";
    return;
  }
  const model = page.memory.models.find((m) => m.model === name);
  if (!model) return;
  const need = Object.entries(model.estimate || {}).map(([d, b]) => `${size(b)} on ${d}`).join(", ") || "unknown";
  let verdict;
  if (model.fits_now) verdict = "it fits now; nothing would be evicted.";
  else if (model.fits_after_eviction) verdict = `it fits after evicting ${(model.evicts || []).join(", ")}.`;
  else verdict = "it does not fit, even with every idle model evicted.";
  out.textContent = `${name} needs ${need}: ${verdict} (a plan; nothing is done)`;
}

// -- logs ------------------------------------------------------------------------------------
function requestLine(event) {
  const time = new Date(event.time * 1000).toLocaleTimeString();
  const tokens = event.prompt_tokens !== null && event.prompt_tokens !== undefined
    ? ` tokens ${event.prompt_tokens}/${event.completion_tokens}` : "";
  const extra = (event.error ? ` ${event.error}` : "") + (event.cancelled ? " cancelled" : "");
  return `${time} ${event.model || "-"} ${event.method} ${event.route} ${event.status} ` +
    `${event.duration.toFixed(3)} s${tokens}${event.key ? ` key=${event.key}` : ""}${extra}`;
}

function appendLog(which, line) {
  if (page.paused) {
    const held = page.held[which];
    held.push(line);
    if (held.length > MAX_LOG_LINES) held.shift();
    return;
  }
  writeLines(which, [line]);
}

function writeLines(which, lines) {
  const pre = which === "backend" ? $("backend-log") : $("request-log");
  const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 20;
  const text = pre.textContent + lines.map((l) => l + "\n").join("");
  const kept = text.split("\n");
  pre.textContent = kept.length > MAX_LOG_LINES ? kept.slice(-MAX_LOG_LINES).join("\n") : text;
  if (atBottom) pre.scrollTop = pre.scrollHeight;
}

async function chooseLogModel() {
  page.logModel = $("log-model").value;
  $("backend-log").textContent = "";
  page.held.backend = [];
  if (page.logModel) {
    try {
      const recent = await api(`/admin/models/${encodeURIComponent(page.logModel)}/logs?lines=200`);
      writeLines("backend", recent.lines);
    } catch (error) {
      writeLines("backend", [`(cannot read its log: ${error.message})`]);
    }
  }
  connect(); // follow the chosen model's lines on the one event stream
}

function togglePause() {
  page.paused = !page.paused;
  $("pause").setAttribute("aria-pressed", String(page.paused));
  $("pause").textContent = page.paused ? "Resume" : "Pause";
  if (!page.paused) {
    for (const which of ["backend", "requests"]) {
      if (page.held[which].length) writeLines(which, page.held[which]);
      page.held[which] = [];
    }
  }
}

// -- the key ---------------------------------------------------------------------------------
async function identify() {
  try {
    const who = await api("/admin/whoami");
    page.admin = who.admin;
    $("who").textContent = who.key ? `key ${who.key}${who.admin ? " (admin)" : ""}` : "no key";
  } catch (error) {
    page.admin = false;
    $("who").textContent = page.key ? `key refused: ${error.message}` : "";
  }
  $("rescan").hidden = !page.admin;
}

async function useKey(key) {
  page.key = key;
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
  $("key").value = "";
  await identify();
  connect();
}

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  useKey($("key").value.trim());
});
$("forget-key").addEventListener("click", () => useKey(""));
$("rescan").addEventListener("click", async () => {
  try {
    await api("/admin/rescan", { method: "POST" });
  } catch (error) {
    $("models-error").textContent = `Rescan: ${error.message}`;
    $("models-error").hidden = false;
  }
  scheduleRefresh();
});
$("plan-model").addEventListener("change", renderPlan);
$("log-model").addEventListener("change", chooseLogModel);
$("pause").addEventListener("click", togglePause);

identify().then(connect); // not awaited at the top: the playground, importing this, starts at once
