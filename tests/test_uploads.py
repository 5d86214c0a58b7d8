"""Uploads (OpenAI's audio routes, multipart/form-data): routed by the form's model field and
relayed to llama-server as they arrive, bounded like every body (routerd/front/uploads.py)."""

from __future__ import annotations

import openai
import pytest
import trio

from routerd.errors import BadRequest
from routerd.front.requested import form_boundary, form_model
from tests.conftest import make_config

BOUNDARY = b"b0undary"


def part(name: str, content: bytes, filename: str | None = None) -> bytes:
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
    return b"--" + BOUNDARY + f"\r\nContent-Disposition: {disposition}\r\n\r\n".encode() + content + b"\r\n"


def test_the_model_field_is_read_as_soon_as_it_has_arrived_whole():
    body = part("model", b"whisper") + part("file", b"RIFF" * 100, "a.wav") + b"--" + BOUNDARY + b"--\r\n"
    assert form_boundary(b'multipart/form-data; boundary="b0undary"') == BOUNDARY
    assert form_boundary(b"application/json") is None
    cut = body.index(b"whisper") + 3
    assert form_model(body[:cut], BOUNDARY) is None  # not whole yet
    assert form_model(body[:body.index(b"RIFF")], BOUNDARY) == "whisper"  # the file need not have come
    late = part("file", b"RIFF", "a.wav") + part("model", b"w2") + b"--" + BOUNDARY + b"--\r\n"
    assert form_model(late, BOUNDARY) == "w2"
    with pytest.raises(BadRequest):
        form_model(part("file", b"x", "a.wav") + b"--" + BOUNDARY + b"--\r\n", BOUNDARY)


async def test_a_transcription_is_routed_by_its_form_and_relayed_as_it_arrives(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"whisper": {"path": model_file("whisper")},
                                                   "other": {"path": model_file("other")}},
                                        server={"max_body_bytes": 8 << 20}))
    client = openai.AsyncOpenAI(base_url=r.url + "/v1", api_key="unused", max_retries=0)
    audio = bytes(range(256)) * (4 << 10)  # 1 MiB
    for create in (client.audio.transcriptions.create, client.audio.translations.create):
        answer = await create(model="whisper", file=("speech.wav", audio))
        assert answer.text == f"fake transcription of {len(audio)} bytes"
    assert r.supervisor.running("other") is None

    # Streamed: llama-server gets the upload while the client is still sending it.
    head = part("model", b"whisper") + b"--" + BOUNDARY + \
        b'\r\nContent-Disposition: form-data; name="file"; filename="a.wav"\r\n\r\n'
    tail = b"\r\n--" + BOUNDARY + b"--\r\n"

    async def body():
        yield head + audio[:1000]
        with trio.fail_after(10):
            while not (await r.http.get("/whisper/props")).json()["fake_upload_started"]:
                await trio.sleep(0.02)
        yield audio[1000:] + tail

    length = len(head) + len(audio) + len(tail)
    streamed = await r.http.post("/v1/audio/transcriptions", content=body(), headers={
        "content-type": f"multipart/form-data; boundary={BOUNDARY.decode()}", "content-length": str(length)})
    # (A proxy that read the whole upload first would never have reached llama-server while the
    # body waited: the poll above would have timed out.)
    assert streamed.status_code == 200 and streamed.json()["received"] == length

    big = await r.http.post("/v1/audio/transcriptions", files={"file": ("big.wav", b"x" * (9 << 20))},
                            data={"model": "whisper"})
    assert big.status_code == 413 and big.json()["error"]["type"] == "invalid_request_error"
    missing = await r.http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"x")})
    assert missing.status_code == 400 and missing.json()["error"]["code"] == "missing_model"
    unknown = await r.http.post("/v1/audio/transcriptions", files={"file": ("a.wav", b"x")}, data={"model": "nope"})
    assert unknown.status_code == 404
