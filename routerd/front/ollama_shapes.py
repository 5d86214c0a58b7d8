"""Ollama's API shapes and llama-server's OpenAI ones, translated both ways: pure functions.

Owns what an Ollama request becomes as an OpenAI request (``chat_request``, ``generate_request``,
``embed_request``: messages, images, tools, ``format``, ``think``, ``options``), what an OpenAI
answer becomes for an Ollama client (``Translator``: an event stream as NDJSON lines, token by
token, or one whole answer), the model listings' entries (``model_entry``, ``running_entry``,
``show``), Ollama's model names (``ollama_name``, ``candidates``) and ``keep_alive``
(``keep_alive_seconds``). No I/O: ``front/ollama.py`` reads and writes, this only reshapes.

``options.num_ctx`` is ignored: the context size is the model's config (its llama-server runs
with one ``--ctx-size`` for every client).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
import time
from typing import Any

#: The Ollama API version routerd answers ``GET /api/version`` with (clients check features by it).
OLLAMA_VERSION = "0.12.6"
#: Ollama's options with the same name and meaning in llama-server's OpenAI endpoints.
_SAME_OPTIONS = ("temperature", "top_p", "top_k", "seed", "repeat_penalty", "repeat_last_n", "presence_penalty",
                 "frequency_penalty", "min_p", "typical_p", "mirostat", "mirostat_tau", "mirostat_eta")
_DONE_REASONS = {"stop": "stop", "length": "length", "tool_calls": "stop", "content_filter": "stop"}
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
#: Base64 openings of image formats, for an image's data URL.
_IMAGE_MAGIC = (("/9j/", "image/jpeg"), ("iVBOR", "image/png"), ("R0lGOD", "image/gif"), ("UklGR", "image/webp"))


class ShapeError(ValueError):
    """A request Ollama would refuse (400), worded for the client."""


# -- names -------------------------------------------------------------------------------------
def ollama_name(name: str) -> str:
    """routerd's model name as Ollama clients write it: ``NAME:latest`` when it has no tag.

    >>> ollama_name("smollm2-135m"), ollama_name("org/repo:Q4_K_M")
    ('smollm2-135m:latest', 'org/repo:Q4_K_M')
    """
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def candidates(requested: str) -> list[str]:
    """The routerd names an Ollama client's model name may mean, best first.

    >>> candidates("smollm2-135m:latest")
    ['smollm2-135m:latest', 'smollm2-135m']
    """
    names = [requested]
    if requested.endswith(":latest"):
        names.append(requested[:-len(":latest")])
    for prefix in ("hf.co/", "huggingface.co/"):
        if requested.startswith(prefix):
            names += candidates(requested[len(prefix):])
    return names


def not_found(requested: str) -> str:
    return f'model "{requested}" not found, try pulling it first'


def pull_ref(requested: str) -> str:
    """What ``/api/pull`` names as routerd's pull reference (``org/repo[:QUANT]``)."""
    for prefix in ("hf.co/", "huggingface.co/"):
        if requested.startswith(prefix):
            requested = requested[len(prefix):]
    return requested[:-len(":latest")] if requested.endswith(":latest") else requested


def keep_alive_seconds(value: object) -> float | None:
    """``keep_alive`` in seconds: None when not given, 0 to unload after the answer, a negative
    number to keep the model loaded; numbers are seconds, strings Go durations (``"5m"``,
    ``"1h30m"``, ``"30s"``) or numbers.

    >>> keep_alive_seconds("5m"), keep_alive_seconds(0), keep_alive_seconds("-1"), keep_alive_seconds("1h30m")
    (300.0, 0.0, -1.0, 5400.0)
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ShapeError(f"keep_alive: {value!r} is not a duration")
    if isinstance(value, int | float):
        return float(value)
    if not isinstance(value, str):
        raise ShapeError(f"keep_alive: {value!r} is not a duration")
    text = value.strip()
    try:
        return float(text)
    except ValueError:
        pass
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    parts = _DURATION_RE.findall(text)
    if not text or "".join(number + unit for number, unit in parts) != text:
        raise ShapeError(f"keep_alive: {value!r} is not a duration (say \"5m\", \"30s\", 0 or -1)")
    return sign * sum(float(number) * _UNITS[unit] for number, unit in parts)


def timestamp(seconds: float | None = None) -> str:
    """An RFC 3339 time in UTC, as Ollama writes ``created_at``."""
    when = datetime.datetime.fromtimestamp(time.time() if seconds is None else seconds, datetime.UTC)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- requests ----------------------------------------------------------------------------------
def _options(body: dict[str, Any], payload: dict[str, Any]) -> None:
    options = body.get("options") or {}
    if not isinstance(options, dict):
        raise ShapeError("options must be an object")
    for name in _SAME_OPTIONS:
        if options.get(name) is not None:
            payload[name] = options[name]
    predict = options.get("num_predict")
    if isinstance(predict, int) and predict >= 0:
        payload["max_tokens"] = predict
    if options.get("stop"):
        payload["stop"] = options["stop"] if isinstance(options["stop"], list) else [options["stop"]]
    if isinstance(options.get("num_keep"), int):
        payload["n_keep"] = options["num_keep"]
    # num_ctx: ignored, the model's config sets the context (see the module's docstring)


def _format(body: dict[str, Any], payload: dict[str, Any]) -> None:
    wanted = body.get("format")
    if wanted in (None, ""):
        return
    if wanted == "json":
        payload["response_format"] = {"type": "json_object"}
    elif isinstance(wanted, dict):
        payload["response_format"] = {"type": "json_schema", "json_schema": {"name": "format", "schema": wanted}}
    else:
        raise ShapeError(f"format must be \"json\" or a JSON schema, not {wanted!r}")


def _think(body: dict[str, Any], payload: dict[str, Any]) -> None:
    think = body.get("think")
    if think is None:
        return
    if think is False:
        payload["chat_template_kwargs"] = {"enable_thinking": False}
        return
    payload["chat_template_kwargs"] = {"enable_thinking": True}
    payload["reasoning_format"] = "deepseek"  # the reasoning apart, as reasoning_content
    if isinstance(think, str):  # "low", "medium", "high" (gpt-oss)
        payload["reasoning_effort"] = think


def image_part(image: str) -> dict[str, Any]:
    """A base64 image as an OpenAI ``image_url`` content part (a data URL)."""
    if image.startswith("data:"):
        return {"type": "image_url", "image_url": {"url": image}}
    mime = next((kind for magic, kind in _IMAGE_MAGIC if image.startswith(magic)), "image/png")
    return {"type": "image_url", "image_url": {"url": f"data:{mime};base64,{image}"}}


def _content(text: str, images: object) -> str | list[dict[str, Any]]:
    if not images:
        return text
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ShapeError("images must be a list of base64 strings")
    return [{"type": "text", "text": text}, *(image_part(image) for image in images)]


def openai_messages(messages: object) -> list[dict[str, Any]]:
    """Ollama's chat messages as OpenAI's: images as content parts, tool calls with their
    arguments as JSON text, each tool answer tied to the call it answers (by order)."""
    if not isinstance(messages, list):
        raise ShapeError("messages must be a list")
    result: list[dict[str, Any]] = []
    call_ids: list[str] = []
    answered = 0
    for message in messages:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ShapeError("each message must be an object with a role")
        role = message["role"]
        out: dict[str, Any] = {"role": role, "content": _content(str(message.get("content") or ""),
                                                                  message.get("images"))}
        calls = message.get("tool_calls")
        if role == "assistant" and calls:
            out["tool_calls"] = []
            for call in calls:
                function = call.get("function", {})
                call_id = call.get("id") or f"call_{len(call_ids)}"
                call_ids.append(call_id)
                arguments = function.get("arguments", {})
                out["tool_calls"].append({"id": call_id, "type": "function", "function": {
                    "name": function.get("name", ""),
                    "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}})
        if role == "tool":
            out["tool_call_id"] = message.get("tool_call_id") or (
                call_ids[answered] if answered < len(call_ids) else f"call_{answered}")
            answered += 1
        result.append(out)
    return result


def _common(body: dict[str, Any], model: str, stream: bool) -> dict[str, Any]:
    payload: dict[str, Any] = {"model": model, "stream": stream}
    if stream:
        payload["stream_options"] = {"include_usage": True}
    _options(body, payload)
    _format(body, payload)
    return payload


def chat_request(body: dict[str, Any], model: str) -> dict[str, Any]:
    """``POST /api/chat``'s body as ``/v1/chat/completions``'."""
    payload = _common(body, model, wants_stream(body))
    payload["messages"] = openai_messages(body.get("messages") or [])
    if body.get("tools"):
        payload["tools"] = body["tools"]
    _think(body, payload)
    return payload


def generate_request(body: dict[str, Any], model: str) -> tuple[str, dict[str, Any]]:
    """``POST /api/generate``'s body as an OpenAI request, and the path it goes to: the raw
    prompt as it is to ``/v1/completions``, else the prompt (with its ``system`` and images) as a
    chat through the model's template."""
    prompt = body.get("prompt") or ""
    if not isinstance(prompt, str):
        raise ShapeError("prompt must be a string")
    payload = _common(body, model, wants_stream(body))
    if body.get("raw"):
        payload["prompt"] = prompt
        return "/v1/completions", payload
    messages: list[dict[str, Any]] = []
    if body.get("system"):
        messages.append({"role": "system", "content": str(body["system"])})
    messages.append({"role": "user", "content": _content(prompt, body.get("images"))})
    payload["messages"] = messages
    _think(body, payload)
    return "/v1/chat/completions", payload


def embed_request(body: dict[str, Any], model: str, legacy: bool) -> dict[str, Any]:
    """``/api/embed`` (``input``: a text or a list) or ``/api/embeddings`` (``prompt``) as
    ``/v1/embeddings``'."""
    given = body.get("prompt", "") if legacy else body.get("input", "")
    if not (isinstance(given, str) or (isinstance(given, list) and all(isinstance(t, str) for t in given))):
        raise ShapeError("input must be a text or a list of texts")
    payload: dict[str, Any] = {"model": model, "input": given}
    if isinstance(body.get("dimensions"), int):
        payload["dimensions"] = body["dimensions"]
    return payload


def wants_stream(body: dict[str, Any]) -> bool:
    """Ollama streams unless the body says ``"stream": false``."""
    return body.get("stream") is not False


# -- answers -----------------------------------------------------------------------------------
def error_message(data: bytes) -> str:
    """The message of an error answer (OpenAI's or llama-server's shape, or plain text)."""
    try:
        payload = json.loads(data)
    except ValueError:
        return data.decode("utf-8", "replace").strip() or "error"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    if isinstance(error, str):
        return error
    return str(payload)


def _tool_calls(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """OpenAI tool calls (arguments as JSON text) in Ollama's shape (arguments as an object)."""
    result = []
    for index, call in enumerate(calls):
        function = call.get("function") or {}
        text = function.get("arguments") or "{}"
        try:
            arguments = json.loads(text) if isinstance(text, str) else text
        except ValueError:
            arguments = {"arguments": text}
        result.append({"id": call.get("id", f"call_{index}"),
                       "function": {"index": index, "name": function.get("name", ""), "arguments": arguments}})
    return result


class Translator:
    """One OpenAI answer as Ollama's: ``feed`` takes an event stream's bytes as they arrive and
    gives the NDJSON lines they make (a line per token); ``finish`` the last line (``done``,
    with the counts and durations); ``whole`` a non-streamed answer as one object.

    ``kind`` is "chat" (``message``) or "generate" (``response``); ``began`` the request's
    start (``time.monotonic``), ``load`` the seconds spent loading the model (set before
    ``finish``)."""

    def __init__(self, model: str, kind: str, began: float) -> None:
        self.model = model
        self.kind = kind
        self.began = began
        self.load = 0.0
        self.finish_reason: str | None = None
        self.usage: dict[str, Any] = {}
        self.timings: dict[str, Any] = {}
        self.error: str | None = None
        self.done = False
        self._buffer = b""
        self._calls: dict[int, dict[str, Any]] = {}

    def _line(self, content: str = "", thinking: str = "", calls: list[dict[str, Any]] | None = None,
              ) -> dict[str, Any]:
        line: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        if self.kind == "chat":
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if thinking:
                message["thinking"] = thinking
            if calls:
                message["tool_calls"] = calls
            line["message"] = message
        else:
            line["response"] = content
            if thinking:
                line["thinking"] = thinking
        line["done"] = False
        return line

    def feed(self, data: bytes) -> list[bytes]:
        """The NDJSON lines the stream's next bytes complete (none for a partial event)."""
        self._buffer += data.replace(b"\r\n", b"\n")
        lines: list[bytes] = []
        while b"\n\n" in self._buffer:
            event, self._buffer = self._buffer.split(b"\n\n", 1)
            for field in event.split(b"\n"):
                if field.startswith(b"data:"):
                    line = self._event(field[5:].strip())
                    if line is not None:
                        lines.append(encode(line))
        return lines

    def _event(self, data: bytes) -> dict[str, Any] | None:
        if data == b"[DONE]" or not data:
            return None
        try:
            chunk = json.loads(data)
        except ValueError:
            return None
        if not isinstance(chunk, dict):
            return None
        if "error" in chunk:
            self.error = error_message(data)
            return {"error": self.error}
        self._counts(chunk)
        choices = chunk.get("choices") or []
        if not choices:
            return None
        choice = choices[0]
        if choice.get("finish_reason"):
            self.finish_reason = choice["finish_reason"]
        delta = choice.get("delta") or {}
        for call in delta.get("tool_calls") or []:
            kept = self._calls.setdefault(call.get("index", len(self._calls)), {"function": {"arguments": ""}})
            if call.get("id"):
                kept["id"] = call["id"]
            function = call.get("function") or {}
            if function.get("name"):
                kept["function"]["name"] = function["name"]
            kept["function"]["arguments"] += function.get("arguments") or ""
        content = delta.get("content") or choice.get("text") or ""
        thinking = delta.get("reasoning_content") or ""
        if self.finish_reason and self._calls:
            calls = _tool_calls([self._calls[i] for i in sorted(self._calls)])
            self._calls.clear()
            return self._line(content, thinking, calls)
        if not content and not thinking:
            return None
        return self._line(content, thinking)

    def _counts(self, chunk: dict[str, Any]) -> None:
        if isinstance(chunk.get("usage"), dict):
            self.usage = chunk["usage"]
        if isinstance(chunk.get("timings"), dict):
            self.timings = chunk["timings"]

    def finish(self) -> bytes:
        """The stream's last line: ``done``, why, and the counts and durations (ns)."""
        self.done = True
        if self._calls:  # a stream that ended without a finish reason after its calls
            self.finish_reason = self.finish_reason or "tool_calls"
            line = self._line(calls=_tool_calls([self._calls[i] for i in sorted(self._calls)]))
        else:
            line = self._line()
        return encode(self._final(line))

    def _final(self, line: dict[str, Any]) -> dict[str, Any]:
        timings, usage = self.timings, self.usage
        line["done"] = True
        line["done_reason"] = _DONE_REASONS.get(self.finish_reason or "stop", self.finish_reason or "stop")
        line["total_duration"] = int((time.monotonic() - self.began) * 1e9)
        line["load_duration"] = int(self.load * 1e9)
        line["prompt_eval_count"] = int(usage.get("prompt_tokens") or timings.get("prompt_n") or 0)
        line["prompt_eval_duration"] = int(float(timings.get("prompt_ms") or 0) * 1e6)
        line["eval_count"] = int(usage.get("completion_tokens") or timings.get("predicted_n") or 0)
        line["eval_duration"] = int(float(timings.get("predicted_ms") or 0) * 1e6)
        return line

    def whole(self, data: bytes) -> dict[str, Any]:
        """A non-streamed OpenAI answer as Ollama's one object."""
        answer = json.loads(data)
        self._counts(answer)
        choice = (answer.get("choices") or [{}])[0]
        self.finish_reason = choice.get("finish_reason")
        message = choice.get("message") or {}
        calls = _tool_calls(message.get("tool_calls") or [])
        line = self._line(message.get("content") or choice.get("text") or "", message.get("reasoning_content") or "",
                          calls)
        self.done = True
        return self._final(line)


def embeddings(data: bytes, model: str, legacy: bool, began: float, load: float) -> dict[str, Any]:
    """``/v1/embeddings``' answer as ``/api/embed``'s (or the older ``/api/embeddings``')."""
    answer = json.loads(data)
    vectors = [item["embedding"] for item in sorted(answer.get("data") or [], key=lambda d: d.get("index", 0))]
    if legacy:
        return {"embedding": vectors[0] if vectors else []}
    return {"model": model, "embeddings": vectors, "total_duration": int((time.monotonic() - began) * 1e9),
            "load_duration": int(load * 1e9),
            "prompt_eval_count": int((answer.get("usage") or {}).get("prompt_tokens") or 0)}


def encode(line: dict[str, Any]) -> bytes:
    return json.dumps(line, ensure_ascii=False).encode() + b"\n"


# -- models ------------------------------------------------------------------------------------
def _parameter_size(metadata: dict[str, Any]) -> str:
    if metadata.get("size_label"):
        return str(metadata["size_label"])
    count = metadata.get("parameters")
    if not isinstance(count, int) or count <= 0:
        return ""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f}".rstrip("0").rstrip(".") + unit
    return str(count)


def details(metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Ollama's ``details`` of a model from routerd's GGUF metadata (``ModelStatus.metadata``)."""
    metadata = metadata or {}
    family = str(metadata.get("architecture") or "")
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family] if family else None,
            "parameter_size": _parameter_size(metadata), "quantization_level": str(metadata.get("quantization") or "")}


def digest(path: str) -> str:
    """A stable digest for a model: the SHA-256 of its path (hashing gigabytes is not listing)."""
    return hashlib.sha256(path.encode()).hexdigest()


def model_entry(name: str, path: str, metadata: dict[str, Any] | None, modified: float | None) -> dict[str, Any]:
    """One model as ``GET /api/tags`` lists it."""
    size = int((metadata or {}).get("file_size") or 0)
    shown = ollama_name(name)
    return {"name": shown, "model": shown, "modified_at": timestamp(modified or 0.0), "size": size,
            "digest": digest(path), "details": details(metadata)}


def running_entry(name: str, path: str, metadata: dict[str, Any] | None, size: int, size_vram: int,
                  ttl_left: float | None, context_length: int) -> dict[str, Any]:
    """One loaded model as ``GET /api/ps`` lists it; ``ttl_left`` None: it never expires."""
    shown = ollama_name(name)
    expires = timestamp(time.time() + ttl_left) if ttl_left is not None else "2318-01-01T00:00:00Z"
    return {"name": shown, "model": shown, "size": size, "digest": digest(path), "details": details(metadata),
            "expires_at": expires, "size_vram": size_vram, "context_length": context_length}


def show(path: str, metadata: dict[str, Any] | None, args: list[str], multimodal: bool,
         modified: float | None, template: str = "") -> dict[str, Any]:
    """``POST /api/show``'s answer: details, model_info, and a minimal modelfile."""
    metadata = metadata or {}
    family = str(metadata.get("architecture") or "")
    info: dict[str, Any] = {"general.architecture": family}
    if metadata.get("parameters"):
        info["general.parameter_count"] = metadata["parameters"]
    if family and metadata.get("context_length"):
        info[f"{family}.context_length"] = metadata["context_length"]
    capabilities = ["completion"] + (["vision"] if multimodal else []) + (
        ["embedding"] if "--embeddings" in args or "--embedding" in args else [])
    parameters = " ".join(args)
    return {"license": "", "modelfile": f"FROM {path}\n", "parameters": parameters, "template": template,
            "details": details(metadata), "model_info": info, "capabilities": capabilities,
            "modified_at": timestamp(modified or 0.0)}
