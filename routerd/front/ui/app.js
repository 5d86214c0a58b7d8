// routerd's status page: one event stream per page; every view is re-read when an event says
// something changed. No framework, no build step. Below the views, the playground: a chat with
// any model, streamed, using the same key and the same event stream (for loading progress).

// The event types as routerd defines them (made from routerd.events.EventType): the page names
// a type only through EVENT, so a renamed type cannot silently go unmatched here.
import { EVENT, SNAPSHOT } from "./event-types.js";

const KEY_STORAGE = "routerd-key";
const MAX_LOG_LINES = 1000;
const $ = (id) => document.getElementById(id);

const page = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  admin: false,
  models: [],
  memory: null,
  logModel: "",
  paused: false,
  held: { backend: [], requests: [] },
  stream: null,        // the AbortController of the event stream
  retryDelay: 1000,
  refreshQueued: false,
  refreshMemory: false,
};

function headers() {
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
async function* sseMessages(body) {
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
  followLoading(event);
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
    playground.selectors = listing.data.filter((m) => m.selector);
    $("models-error").hidden = true;
  } catch (error) {
    $("models-error").textContent = `Cannot list models: ${error.message}`;
    $("models-error").hidden = false;
    page.models = [];
    playground.selectors = [];
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
  renderPlaygroundChoices();
}

const GIB = 1024 ** 3;
function size(bytes) {
  if (bytes === null || bytes === undefined) return "–";
  return bytes >= GIB ? `${(bytes / GIB).toFixed(1)} GiB` : `${Math.round(bytes / 1024 ** 2)} MiB`;
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
    cell(row, "In flight", String(model.in_flight), "num");
    cell(row, "Queued", String(model.queued), "num");
    cell(row, "Last used", ago(model.last_used));
    cell(row, "Idle stop", model.idle_ttl_left === null ? "–" : clock(model.idle_ttl_left));
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

// -- the playground --------------------------------------------------------------------------
// A chat with any model or virtual model, streamed as llama-server streams it. Conversations
// live in this page only, one per model; each model's system prompt and sampling settings are
// kept in localStorage, so they come back when the model is picked again, even after a reload.

const PICKED_STORAGE = "routerd-playground-model";
const SETTINGS_STORAGE = "routerd-playground:"; // + the model's name
// The sampling settings: each is sent under its name only when its field is filled, so an empty
// field leaves llama-server's (or the model's args') default in place.
const SAMPLING = [
  { name: "temperature", id: "pg-temperature", parse: Number },
  { name: "top_p", id: "pg-top-p", parse: Number },
  { name: "max_tokens", id: "pg-max-tokens", parse: (raw) => Math.round(Number(raw)) },
  { name: "seed", id: "pg-seed", parse: (raw) => Math.round(Number(raw)) },
];
// routerd's own chunks (scheduler.loading_feedback) have ids with this prefix: their
// reasoning_content says what the request waits for; it is not the model's reasoning.
const FEEDBACK_ID_PREFIX = "chatcmpl-routerd-";
// Past this much more than llama-server's own time to first token, the wait (a load, a queue)
// is worth showing under the answer.
const SHOWN_WAIT_MS = 500;

const playground = {
  model: "",        // the model or virtual model picked
  selectors: [],    // the virtual models, from /v1/models
  chats: new Map(), // model -> { history, view, generation }
  emptyNote: null,  // the hint shown while the picked model's conversation is empty
};

function chatOf(model) {
  let chat = playground.chats.get(model);
  if (!chat) {
    // history: the turns sent with the next message; generation: the answer being streamed.
    chat = { history: [], view: element("div", "chat-turns"), generation: null };
    playground.chats.set(model, chat);
  }
  return chat;
}

function currentChat() {
  return playground.model ? chatOf(playground.model) : null;
}

// The real models a request for `model` may load: itself, or a virtual model's targets (which
// may be aliases).
function targetsOf(model) {
  const selector = playground.selectors.find((s) => s.id === model);
  const names = selector ? selector.selector.targets : [model];
  return names.map((name) => (page.models.find((m) => m.name === name || m.aliases.includes(name)) || { name }).name);
}

function stateOf(model) {
  return (page.models.find((m) => m.name === model) || {}).state;
}

// -- picking a model and its settings --

function renderPlaygroundChoices() {
  const select = $("pg-model");
  const real = page.models.map((m) => m.name);
  const virtual = playground.selectors.map((s) => s.id);
  // A picked model missing from this listing (a refresh that failed) stays picked.
  if (playground.model && !real.includes(playground.model) && !virtual.includes(playground.model)) {
    real.push(playground.model);
  }
  // The list is re-read after every request: rebuilt only when it changed, so a list the user
  // has open stays open.
  const names = JSON.stringify([real, virtual]);
  if (select.dataset.names !== names) {
    select.dataset.names = names;
    const options = [select.options[0], ...real.map(option)];
    if (virtual.length) {
      const group = document.createElement("optgroup");
      group.label = "Virtual models";
      group.append(...virtual.map(option));
      options.push(group);
    }
    select.replaceChildren(...options);
    select.value = playground.model;
  }
  // The first listing after the page opened: pick what was picked last time.
  const last = localStorage.getItem(PICKED_STORAGE);
  if (!playground.model && last && (real.includes(last) || virtual.includes(last))) pickModel(last);
}

function option(name) {
  const made = element("option", "", name);
  made.value = name;
  return made;
}

function pickModel(model) {
  playground.model = model;
  $("pg-model").value = model;
  if (model) localStorage.setItem(PICKED_STORAGE, model);
  $("pg-settings-model").textContent = model || "no model";
  restoreSettings(model);
  showChat();
}

function settingsKey(model) {
  return SETTINGS_STORAGE + model;
}

function restoreSettings(model) {
  let saved = {};
  try {
    saved = (model && JSON.parse(localStorage.getItem(settingsKey(model)) || "{}")) || {};
  } catch {
    saved = {}; // written by something else: start from the defaults
  }
  $("pg-system").value = saved.system || "";
  for (const { name, id } of SAMPLING) $(id).value = saved[name] ?? "";
}

function saveSettings() {
  if (!playground.model) return;
  const saved = { system: $("pg-system").value };
  for (const { name, id } of SAMPLING) {
    if ($(id).value !== "") saved[name] = $(id).value;
  }
  localStorage.setItem(settingsKey(playground.model), JSON.stringify(saved));
}

// The request for the next answer: the system prompt and sampling settings as they are now,
// then the conversation so far.
function chatRequest(model, history) {
  const system = $("pg-system").value.trim();
  const body = {
    model,
    messages: [...(system ? [{ role: "system", content: system }] : []), ...history],
    stream: true,
    stream_options: { include_usage: true },
  };
  for (const { name, id, parse } of SAMPLING) {
    const raw = $(id).value;
    if (raw !== "" && Number.isFinite(parse(raw))) body[name] = parse(raw);
  }
  return body;
}

// -- the conversation's view --

function showChat() {
  const chat = currentChat();
  const log = $("pg-log");
  log.replaceChildren(playground.emptyNote, ...(chat ? [chat.view] : []));
  updateComposer();
  log.scrollTop = log.scrollHeight;
}

function updateComposer() {
  const chat = currentChat();
  const busy = Boolean(chat && chat.generation);
  $("pg-input").disabled = !chat;
  $("pg-send").disabled = !chat || busy;
  $("pg-send").hidden = busy; // Stop takes its place
  $("pg-stop").hidden = !busy;
  $("pg-new").disabled = !chat || !chat.view.childElementCount;
  $("pg-fields").disabled = !chat;
  playground.emptyNote.hidden = Boolean(chat && chat.view.childElementCount);
}

function element(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

function userTurn(text) {
  const turn = element("div", "msg msg-user");
  turn.dataset.role = "user";
  turn.append(element("div", "msg-role", "You"), element("div", "msg-text", text));
  return turn;
}

// An answer's parts: filled while it streams (wait, reasoning, text), completed at its end
// (figures, note). data-state: waiting, streaming, done, stopped or error.
function answerTurn(model) {
  const turn = element("div", "msg msg-assistant");
  turn.dataset.role = "assistant";
  turn.dataset.state = "waiting";
  const parts = {
    element: turn,
    wait: element("p", "msg-wait"),
    waitLabel: element("span"),
    // The clock and llama-server's lines change several times a second: seen, not read aloud.
    waitSeconds: element("span", "seconds"),
    waitDetail: element("span", "detail"),
    reasoning: element("details", "msg-reasoning"),
    thoughts: element("div", "msg-text"),
    text: element("div", "msg-text"),
    figures: element("div", "msg-figures"),
    note: element("p", "msg-note"),
  };
  parts.waitSeconds.setAttribute("aria-hidden", "true");
  parts.waitDetail.setAttribute("aria-hidden", "true");
  parts.wait.append(parts.waitLabel, parts.waitSeconds, parts.waitDetail);
  parts.reasoning.append(element("summary", "", "reasoning"), parts.thoughts);
  parts.reasoning.hidden = parts.note.hidden = true;
  turn.append(element("div", "msg-role", model), parts.wait, parts.reasoning, parts.text, parts.figures, parts.note);
  return parts;
}

// Keep the newest text in sight, unless the reader scrolled up to read something else.
function followingEnd(update) {
  const log = $("pg-log");
  const atEnd = log.scrollHeight - log.scrollTop - log.clientHeight < 40;
  update();
  if (atEnd) log.scrollTop = log.scrollHeight;
}

// -- sending, streaming, stopping --

async function sendMessage(text) {
  const model = playground.model;
  if (!model || !text.trim()) return;
  const chat = chatOf(model);
  if (chat.generation) return;
  const answer = answerTurn(model);
  const generation = {
    model, answer, controller: new AbortController(), stopped: false,
    targets: targetsOf(model), sentAt: performance.now(), firstTokenAt: null, lastTokenAt: null,
    pieces: 0, text: "", timings: null, usage: null, servedBy: null, finishReason: null,
    wait: { text: "", detail: "", ticker: null },
  };
  chat.history.push({ role: "user", content: text });
  const request = chatRequest(model, chat.history);
  chat.generation = generation;
  followingEnd(() => {
    chat.view.append(userTurn(text), answer.element);
    updateComposer();
  });
  startWaiting(generation);
  try {
    await streamChat(request, generation);
    chat.history.push({ role: "assistant", content: generation.text });
    finishAnswer(generation, "done", generation.finishReason === "length" ? "reached max_tokens" : "");
  } catch (error) {
    if (generation.stopped) {
      // The partial answer stays, in the view and in the conversation the model sees next.
      if (generation.text) chat.history.push({ role: "assistant", content: generation.text });
      else chat.history.pop(); // nothing answered: the next message is not sent after a lone one
      finishAnswer(generation, "stopped", "stopped");
    } else {
      chat.history.pop(); // a failed exchange is shown, not sent again
      finishAnswer(generation, "error", describeError(error));
    }
  } finally {
    chat.generation = null;
    if (chat === currentChat()) updateComposer();
  }
}

async function streamChat(request, generation) {
  const response = await fetch("/v1/chat/completions", {
    method: "POST",
    headers: { ...headers(), "Content-Type": "application/json" },
    body: JSON.stringify(request),
    signal: generation.controller.signal,
  });
  if (!response.ok) throw await httpError(response);
  for await (const message of sseMessages(response.body)) {
    if (message.comment !== undefined) {
      // routerd's keep-alive while the request waits for its model (loading, or a queue).
      if (message.comment.startsWith("waiting for") && !generation.wait.text.startsWith("loading")) {
        showWaiting(generation, `${message.comment}…`);
      }
      continue;
    }
    if (message.data === "[DONE]") return;
    const chunk = JSON.parse(message.data);
    // An error after the stream started (a backend that died, a load that failed) comes in-band.
    if (chunk.error) throw chatError(response.status, chunk.error);
    followingEnd(() => takeChunk(generation, chunk));
  }
  throw new Error("the answer ended before it was complete (no [DONE])");
}

function takeChunk(generation, chunk) {
  if (chunk.timings) generation.timings = chunk.timings; // llama-server's, in its final chunks
  if (chunk.usage) generation.usage = chunk.usage;
  const choice = (chunk.choices || [])[0] || {};
  const delta = choice.delta || {};
  if (typeof chunk.id === "string" && chunk.id.startsWith(FEEDBACK_ID_PREFIX)) {
    if (delta.reasoning_content) showWaiting(generation, delta.reasoning_content.trim());
    return;
  }
  if (chunk.model) generation.servedBy = chunk.model; // a virtual model's answer names its target
  if (choice.finish_reason) generation.finishReason = choice.finish_reason;
  const piece = delta.content || "";
  const thought = delta.reasoning_content || "";
  if (!piece && !thought) return; // the role's opening chunk, the final ones
  const now = performance.now();
  if (generation.firstTokenAt === null) {
    generation.firstTokenAt = now;
    stopWaiting(generation);
    generation.answer.element.dataset.state = "streaming";
  }
  generation.lastTokenAt = now;
  generation.pieces += 1; // llama-server streams one token per chunk
  const { answer } = generation;
  if (thought) {
    answer.reasoning.hidden = false;
    answer.thoughts.textContent += thought;
  }
  if (piece) {
    generation.text += piece;
    answer.text.textContent = generation.text;
  }
}

function stopGeneration() {
  const chat = currentChat();
  if (!chat || !chat.generation) return;
  chat.generation.stopped = true;
  chat.generation.controller.abort(); // routerd closes llama-server's connection: it stops too
}

function newChat() {
  const chat = currentChat();
  if (!chat) return;
  if (chat.generation) {
    chat.generation.stopped = true;
    chat.generation.controller.abort();
  }
  // A fresh chat object: the stopped answer finishes into the old one, out of sight.
  playground.chats.delete(playground.model);
  showChat();
  $("pg-input").focus();
}

// -- waiting for the first token: loading progress --

function startWaiting(generation) {
  const targets = generation.targets;
  const states = targets.map(stateOf);
  let text = "waiting for the first token…";
  if (!states.includes("ready")) {
    const loading = targets[states.indexOf("starting")] || (targets.length === 1 ? targets[0] : "");
    text = loading ? `loading ${loading}…` : `loading one of ${targets.join(", ")}…`;
  }
  generation.wait.ticker = setInterval(() => renderWait(generation), 250);
  showWaiting(generation, text);
}

function showWaiting(generation, text, detail = "") {
  if (generation.firstTokenAt !== null || generation.wait.ticker === null) return;
  generation.wait.text = text;
  generation.wait.detail = detail;
  renderWait(generation);
}

function renderWait(generation) {
  const { wait, answer } = generation;
  const seconds = `${((performance.now() - generation.sentAt) / 1000).toFixed(1)} s`;
  // Only what changed is written: a screen reader announces the label's changes alone.
  for (const [part, text] of [[answer.waitLabel, wait.text], [answer.waitSeconds, seconds],
                              [answer.waitDetail, wait.detail]]) {
    if (part.textContent !== text) part.textContent = text;
  }
  answer.waitDetail.hidden = !wait.detail;
}

function stopWaiting(generation) {
  clearInterval(generation.wait.ticker);
  generation.wait.ticker = null;
  generation.answer.wait.hidden = true;
}

// The page's event stream says how a load goes: shown under each answer still waiting for it.
function followLoading(event) {
  for (const chat of playground.chats.values()) {
    const generation = chat.generation;
    if (!generation || !generation.targets.includes(event.model)) continue;
    if (event.type === EVENT.MODEL_LOADING) {
      showWaiting(generation, `loading ${event.model}…`);
    } else if (event.type === EVENT.MODEL_PROGRESS) {
      showWaiting(generation, `loading ${event.model}…`, progressLine(event.line));
    } else if (event.type === EVENT.MODEL_READY) {
      showWaiting(generation, `${event.model} loaded in ${event.load_seconds.toFixed(1)} s; waiting for the first token…`);
    } else if (event.type === EVENT.MODEL_FAILED) {
      showWaiting(generation, `${event.model} failed to load`, event.error || `exit status ${event.exit_code}`);
    }
  }
}

// A llama-server line without its clock and level ("0.00.625.561 W load: ..." -> "load: ...").
function progressLine(line) {
  return (line || "").replace(/^[\d.]+ [A-Z] /, "").trim();
}

// -- an answer's end: figures, notes, errors --

function finishAnswer(generation, state, note) {
  const { answer } = generation;
  stopWaiting(generation);
  answer.element.dataset.state = state;
  answer.note.textContent = note;
  answer.note.hidden = !note;
  answer.note.classList.toggle("error", state === "error");
  if (state === "error") answer.note.setAttribute("role", "alert");
  answer.figures.replaceChildren(...answerFigures(generation).map(figureView));
}

// Time to first token and speed: llama-server's own timings (its final chunk) when it sent
// them; else (a stopped answer, another server) what this page measured, which includes the
// network and any wait in routerd.
function answerFigures(generation) {
  const figures = [];
  const t = generation.timings;
  const waited = generation.firstTokenAt === null ? null : generation.firstTokenAt - generation.sentAt;
  if (t && Number.isFinite(t.prompt_ms) && Number.isFinite(t.predicted_per_second)) {
    figures.push({ name: "ttft", value: t.prompt_ms, text: `first token ${duration(t.prompt_ms)}`,
                   title: `llama-server read ${t.prompt_n} prompt tokens in ${duration(t.prompt_ms)}` +
                          ` (${t.prompt_per_second.toFixed(1)} tokens/s)` });
    figures.push({ name: "tps", value: t.predicted_per_second, text: `${t.predicted_per_second.toFixed(1)} tokens/s`,
                   title: `llama-server generated ${t.predicted_n} tokens in ${duration(t.predicted_ms)}` });
    figures.push({ name: "tokens", value: t.predicted_n, text: `${t.predicted_n} tokens` });
    if (waited !== null && waited - t.prompt_ms > SHOWN_WAIT_MS) {
      figures.push({ name: "wait", value: waited, text: `answered after ${duration(waited)}`,
                     title: "from sending to the first token, with routerd's wait (a load, a queue)" });
    }
  } else if (waited !== null) {
    const measured = "measured in this browser (llama-server sent no timings)";
    figures.push({ name: "ttft", value: waited, text: `first token ${duration(waited)}`, title: measured });
    const streamed = (generation.lastTokenAt - generation.firstTokenAt) / 1000;
    if (generation.pieces > 1 && streamed > 0) {
      const rate = (generation.pieces - 1) / streamed;
      figures.push({ name: "tps", value: rate, text: `${rate.toFixed(1)} tokens/s`, title: measured });
    }
    figures.push({ name: "tokens", value: generation.pieces, text: `${generation.pieces} tokens`, title: measured });
  }
  if (generation.usage && generation.usage.prompt_tokens) {
    const n = generation.usage.prompt_tokens;
    figures.push({ name: "prompt", value: n, text: `prompt ${n} tokens` });
  }
  if (generation.servedBy && generation.servedBy !== generation.model) {
    figures.push({ name: "served-by", value: generation.servedBy, text: `by ${generation.servedBy}` });
  }
  return figures;
}

function figureView({ name, value, text, title }) {
  const view = element("span", "", text);
  view.dataset.figure = name;
  view.dataset.value = String(value);
  if (title) view.title = title;
  return view;
}

function duration(ms) {
  return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(2)} s`;
}

async function httpError(response) {
  const body = await response.json().catch(() => null);
  return chatError(response.status, body && body.error);
}

// The OpenAI error shape ({"error": {"message", "type", "code"}}) as an Error.
function chatError(status, error) {
  const made = new Error((error && error.message) || `HTTP ${status}`);
  made.status = status;
  made.code = error && (error.code || error.type);
  return made;
}

function describeError(error) {
  if (error.status === undefined) return `Error: ${error.message}`; // the network, a cut stream
  return `Error ${error.status}${error.code ? ` (${error.code})` : ""}: ${error.message}`;
}

function setUpPlayground() {
  playground.emptyNote = $("pg-log").querySelector(".chat-empty");
  $("pg-model").addEventListener("change", () => pickModel($("pg-model").value));
  $("pg-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("pg-input").value;
    if (!text.trim() || $("pg-send").disabled) return;
    $("pg-input").value = "";
    sendMessage(text);
  });
  $("pg-input").addEventListener("keydown", (event) => {
    // Enter sends; Shift+Enter, and Enter while an input method composes, make a new line.
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("pg-form").requestSubmit();
    }
  });
  $("pg-stop").addEventListener("click", stopGeneration);
  $("pg-new").addEventListener("click", newChat);
  $("pg-settings").addEventListener("input", saveSettings);
  $("pg-settings").addEventListener("submit", (event) => event.preventDefault());
  updateComposer();
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
setUpPlayground();

await identify();
connect();
