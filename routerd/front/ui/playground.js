// routerd's status page, its playground: a chat with any model or virtual model, streamed as
// llama-server streams it, with the page's key; the page's event stream (app.js) says how a load
// it waits for goes. Conversations live in this page only, one per model; each model's system
// prompt and sampling settings are kept in localStorage, so they come back when the model is
// picked again, even after a reload.

// The event types as routerd defines them: named only through EVENT (see app.js).
import { EVENT } from "./event-types.js";
import { $, element, follow, headers, page, sseMessages } from "./app.js";

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
  const selector = page.selectors.find((s) => s.id === model);
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
  const virtual = page.selectors.map((s) => s.id);
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

setUpPlayground();
// Each listing of the models (after an event, a key): the choices; each event: a load that an
// answer waits for.
follow({ listed: renderPlaygroundChoices, event: followLoading });
