"""The upstream connection pool against a small scripted HTTP/1.1 server (no backend process).

What the proxy relies on: keep-alive reuse, recovery when the server closed an idle socket, a
clear UpstreamError (never a hang) when the server dies or goes silent, and that a response
abandoned half-way is not reused.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import h11
import pytest
import trio
import trio.testing

from routerd.backends.upstream import ConnectionPool, UpstreamError

Handler = Callable[[trio.SocketStream, h11.Connection, h11.Request], Awaitable[bool]]


class ScriptedServer:
    """Answers each request with ``handler``; counts connections."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.port = 0

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        self.connections += 1
        conn = h11.Connection(h11.SERVER)
        async with stream:
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    data = await stream.receive_some(65536)
                    if not data:
                        return
                    conn.receive_data(data)
                    continue
                if isinstance(event, h11.Request):
                    while (rest := conn.next_event()) is not h11.EndOfMessage and type(rest) is not h11.EndOfMessage:
                        if rest is h11.NEED_DATA:
                            conn.receive_data(await stream.receive_some(65536))
                    if not await self.handler(stream, conn, event):
                        return  # the handler wants the connection closed
                    conn.start_next_cycle()
                elif isinstance(event, h11.ConnectionClosed):
                    return


async def answer(stream: trio.SocketStream, conn: h11.Connection, body: bytes = b"ok") -> None:
    await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", str(len(body)))])))
    await stream.send_all(conn.send(h11.Data(data=body)) + conn.send(h11.EndOfMessage()))


@pytest.fixture
async def server_for(nursery):
    async def start(handler: Handler) -> ScriptedServer:
        server = ScriptedServer(handler)
        await nursery.start(server.serve)
        return server
    return start


async def test_sequential_requests_reuse_one_connection(server_for):
    async def ok(stream, conn, request):
        await answer(stream, conn, request.target)
        return True
    server = await server_for(ok)
    pool = ConnectionPool(server.port, max_idle=2)
    for i in range(5):
        response = await pool.request("POST", f"/n{i}", body=b"{}")
        assert response.status == 200 and await response.read() == f"/n{i}".encode()
    assert server.connections == 1


async def test_requests_beyond_max_open_wait_for_a_connection_instead_of_opening_more(server_for):
    """llama-server serves as many requests at once as it has HTTP threads; a request beyond them
    waits in routerd for a connection to come back, and reuses it."""
    busy, peak = 0, 0

    async def slow(stream, conn, request):
        nonlocal busy, peak
        busy += 1
        peak = max(peak, busy)
        await trio.sleep(0.05)
        busy -= 1
        await answer(stream, conn, request.target)
        return True
    server = await server_for(slow)
    pool = ConnectionPool(server.port, max_idle=2, max_open=2)
    answers = []

    async def one(i: int) -> None:
        response = await pool.request("POST", f"/n{i}", body=b"{}")
        answers.append(await response.read())
    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(one, i)
    assert sorted(answers) == sorted(f"/n{i}".encode() for i in range(8))
    assert server.connections == 2 and peak == 2


async def test_a_health_check_is_not_queued_behind_a_full_pool(server_for):
    """max_open holds requests back, but not /health: a check must not wait behind the traffic
    of the backend it judges (two missed checks stop a backend)."""
    release = trio.Event()

    async def held_or_ok(stream, conn, request):
        if request.target == b"/slow":
            await release.wait()
        await answer(stream, conn, request.target)
        return True
    server = await server_for(held_or_ok)
    pool = ConnectionPool(server.port, max_idle=1, max_open=1)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pool.request, "POST", "/slow")
        await trio.testing.wait_all_tasks_blocked()
        with trio.fail_after(2):
            assert await pool.get("/health") == (200, b"/health")
        release.set()
    assert server.connections == 2


async def test_an_idle_socket_the_server_closed_is_replaced_transparently(server_for):
    async def once(stream, conn, request):
        await answer(stream, conn)
        return False  # close after every answer, as a server whose keep-alive timed out
    server = await server_for(once)
    pool = ConnectionPool(server.port, max_idle=2)
    for _ in range(3):
        response = await pool.request("GET", "/health")
        assert await response.read() == b"ok"
    assert server.connections == 3


async def test_a_server_dying_mid_body_is_an_upstream_error(server_for):
    async def dies(stream, conn, request):
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("content-length", "100")])))
        await stream.send_all(conn.send(h11.Data(data=b"partial")))
        return False
    pool = ConnectionPool((await server_for(dies)).port, max_idle=2)
    response = await pool.request("POST", "/v1/completions")
    with pytest.raises(UpstreamError, match="broke the connection"):
        await response.read()


async def test_a_silent_server_times_out_instead_of_hanging(server_for, autojump_clock):
    """On MockClock (the server is in-process, over loopback): the error comes read_timeout after
    the request was sent, not earlier and not at some other bound."""
    async def silent(stream, conn, request):
        await trio.sleep_forever()
    pool = ConnectionPool((await server_for(silent)).port, max_idle=2, read_timeout=0.2)
    began = trio.current_time()
    with trio.fail_after(5), pytest.raises(UpstreamError, match="upstream_read_timeout"):
        await pool.request("POST", "/v1/completions")
    assert trio.current_time() - began == pytest.approx(0.2, abs=1e-6)


async def test_nothing_listening_is_an_upstream_error():
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(UpstreamError, match="cannot reach the backend"):
        await ConnectionPool(port, max_idle=1).request("GET", "/health")


async def test_an_abandoned_response_closes_its_connection_and_ends_once(server_for, autojump_clock):
    async def streams(stream, conn, request):
        await stream.send_all(conn.send(h11.Response(status_code=200, headers=[("transfer-encoding", "chunked")])))
        for i in range(100):
            await stream.send_all(conn.send(h11.Data(data=b"data: %d\n\n" % i)))
            await trio.sleep(0.01)  # MockClock: paced without waiting
        await stream.send_all(conn.send(h11.EndOfMessage()))
        return True
    server = await server_for(streams)
    pool = ConnectionPool(server.port, max_idle=2)
    ended = []
    response = await pool.request("POST", "/v1/chat/completions")
    response.on_end = lambda: ended.append(True)
    assert (await response.__anext__()).startswith(b"data: 0")
    response.aclose_now()
    response.aclose_now()
    assert ended == [True]
    second = await pool.request("POST", "/v1/chat/completions")  # a fresh connection, not the half-read one
    second.aclose_now()
    assert server.connections == 2
