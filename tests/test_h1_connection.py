"""routerd's own HTTP/1.1 connections, end to end through a daemon and the fake llama-server.

What a client of the new handler relies on beyond single requests: pipelined requests answered
in order with proxied and Quart-served ones mixed on one connection, ``Expect: 100-continue``,
HEAD, HTTP/1.0 clients, answers framed the way each client can read them, a body too large to
drain ending the connection, and HTTP/2 without TLS (prior knowledge) handed to hypercorn. The
verdicts on malformed bytes are in test_h1_differential.py.
"""

from __future__ import annotations

import json

import httpx
import trio

from routerd.front.keys import KeySettings
from tests.conftest import make_config

CHAT = "/v1/chat/completions"


def chat_body(model: str, **extra: object) -> bytes:
    return json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                       **extra}).encode()


async def connect(url: str) -> trio.SocketStream:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return await trio.open_tcp_stream(host, int(port))


async def read_answers(stream: trio.SocketStream, count: int) -> list[tuple[int, dict[bytes, bytes], bytes]]:
    """Read ``count`` answers (status, headers, body) framed by Content-Length or chunks."""
    buffer = b""
    answers = []

    async def more() -> None:
        nonlocal buffer
        chunk = await stream.receive_some(65536)
        assert chunk, f"the connection closed after {len(answers)} answers: {buffer[:200]!r}"
        buffer += chunk

    with trio.fail_after(10):
        while len(answers) < count:
            while b"\r\n\r\n" not in buffer:
                await more()
            head, buffer = buffer.split(b"\r\n\r\n", 1)
            status_line, *lines = head.split(b"\r\n")
            status = int(status_line.split()[1])
            headers = {name.lower(): value.strip() for name, _, value in (line.partition(b":") for line in lines)}
            if status == 100:
                continue
            if b"content-length" in headers:
                size = int(headers[b"content-length"])
                while len(buffer) < size:
                    await more()
                body, buffer = buffer[:size], buffer[size:]
            else:
                assert headers.get(b"transfer-encoding") == b"chunked", headers
                body = b""
                while True:
                    while b"\r\n" not in buffer:
                        await more()
                    size_line, rest = buffer.split(b"\r\n", 1)
                    size = int(size_line, 16)
                    while len(rest) < size + 2:
                        await more()
                        size_line, rest = buffer.split(b"\r\n", 1)
                    body += rest[:size]
                    buffer = rest[size + 2:]
                    if size == 0:
                        break
            answers.append((status, headers, body))
    return answers


async def test_pipelined_requests_are_answered_in_order_proxied_and_views_mixed(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    body = chat_body("a")
    stream_body = chat_body("a", stream=True)
    requests = (b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n"
                + b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (CHAT.encode(), len(body), body)
                + b"GET /v1/models HTTP/1.1\r\nhost: x\r\n\r\n"
                + b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n%s" % (
                    CHAT.encode(), len(stream_body), stream_body)
                + b"GET /no/such/thing HTTP/1.1\r\nhost: x\r\n\r\n")
    async with await connect(r.url) as stream:
        await stream.send_all(requests)  # all at once: the server must answer them one after another
        answers = await read_answers(stream, 5)
    assert [status for status, _, _ in answers] == [200, 200, 200, 200, 404]
    assert json.loads(answers[0][2])["status"] == "ok"
    assert json.loads(answers[1][2])["object"] == "chat.completion" and answers[1][1][b"x-routerd-model"] == b"a"
    assert [m["id"] for m in json.loads(answers[2][2])["data"]] == ["a"]
    assert answers[3][1][b"content-type"].startswith(b"text/event-stream")
    assert answers[3][2].rstrip().endswith(b"data: [DONE]")
    assert json.loads(answers[4][2])["error"]["code"] == "route_not_found"


async def test_expect_100_continue_is_answered_before_the_body_is_sent(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    body = chat_body("a")
    async with await connect(r.url) as stream:
        await stream.send_all(b"POST %s HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: %d\r\n\r\n"
                              % (CHAT.encode(), len(body)))
        with trio.fail_after(5):
            interim = await stream.receive_some(65536)  # nothing but the go-ahead before the body
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        await stream.send_all(body)
        [(status, _, answer)] = await read_answers(stream, 1)
    assert status == 200 and json.loads(answer)["object"] == "chat.completion"


async def test_head_gets_the_headers_and_no_body(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    async with await connect(r.url) as stream:
        await stream.send_all(b"HEAD /v1/models HTTP/1.1\r\nhost: x\r\n\r\nGET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        received = b""
        with trio.fail_after(5):
            while received.count(b"HTTP/1.1 200") < 2 or not received.endswith(b"}"):
                received += await stream.receive_some(65536)
    head_answer, get_answer = received.split(b"HTTP/1.1 200", 2)[1:]
    head_lines, after_head = head_answer.split(b"\r\n\r\n", 1)
    assert after_head == b"", f"a HEAD answer carried a body: {after_head[:60]!r}"
    assert b"content-length" in head_lines.lower()  # the GET's length, as HTTP says
    assert b'"status"' in get_answer


async def test_an_http_1_0_client_gets_a_stream_to_the_close_and_plain_answers_with_lengths(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    for body, streamed in ((chat_body("a", stream=True), True), (chat_body("a"), False)):
        async with await connect(r.url) as stream:
            request = b"POST %s HTTP/1.0\r\ncontent-length: %d\r\n\r\n" % (CHAT.encode(), len(body))
            await stream.send_all(request + body)
            received = b""
            with trio.fail_after(5):
                while chunk := await stream.receive_some(65536):  # HTTP/1.0: the server closes
                    received += chunk
        head, _, answer = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and b"transfer-encoding" not in head.lower()
        if streamed:
            assert answer.rstrip().endswith(b"data: [DONE]") and b"connection: close" in head.lower()
        else:
            assert b"content-length: %d" % len(answer) in head.lower()


async def test_a_refused_body_too_large_to_drain_ends_the_connection_after_the_answer(
        start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    r.daemon.operations.add_key("k", KeySettings())  # the request below has no key: refused unread
    async with await connect(r.url) as stream:
        await stream.send_all(b"POST %s HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n{" % (CHAT.encode(), 50 << 20))
        received = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 401") and b"connection: close" in received.lower()


async def test_http2_without_tls_is_served_by_hypercorn_on_the_same_port(start_routerd, tmp_path, model_file):
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    async with httpx.AsyncClient(base_url=r.url, http1=False, http2=True, trust_env=False) as h2_client:
        answer = await h2_client.post(CHAT, content=chat_body("a"), headers={"content-type": "application/json"})
        health = await h2_client.get("/health")
    assert answer.http_version == "HTTP/2" and answer.status_code == 200
    assert answer.json()["object"] == "chat.completion" and health.json()["status"] == "ok"


async def test_a_refused_request_that_expects_100_continue_is_not_asked_for_its_body(start_routerd, tmp_path,
                                                                                   model_file):
    """RFC 9110 section 10.1.1: the final status instead of 100 Continue when the body will not
    be used; the connection then ends (the body never came)."""
    r = await start_routerd(make_config(tmp_path, {"a": {"path": model_file("a")}}))
    r.daemon.operations.add_key("k", KeySettings())
    async with await connect(r.url) as stream:
        await stream.send_all(b"POST %s HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 500\r\n\r\n"
                              % CHAT.encode())
        received = b""
        with trio.fail_after(5):
            while chunk := await stream.receive_some(65536):
                received += chunk
    assert received.startswith(b"HTTP/1.1 401"), received[:80]
    assert b"100 Continue" not in received and b"connection: close" in received.lower()
