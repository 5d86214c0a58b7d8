"""A stand-in for the Hugging Face hub on loopback (HF_ENDPOINT), for `routerctl pull` tests.

Serves the two calls a pull makes: the repo tree (/api/models/{repo}/tree/{rev}) and file
downloads (/{repo}/resolve/{rev}/{file}, HEAD and GET with Range). Faults: a repo may need a
token (401 GatedRepo without it), a file's downloads may be cut off half-way (to test resume).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.gated: dict[str, str] = {}  # repo -> the token it wants
        self.cuts: dict[str, int] = {}  # "repo/file" -> how many more GETs are cut half-way
        #: Every download (GET of a file) as ("repo/file", the byte it started from: 0, or a Range's).
        self.downloads: list[tuple[str, int]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:
                pass

            def _error(self, status: int, code: str) -> None:
                body = json.dumps({"error": code}).encode()
                self.send_response(status)
                self.send_header("X-Error-Code", code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _repo(self, repo: str) -> dict[str, bytes] | None:
                if repo not in hub.repos:
                    self._error(401 if not self.headers.get("Authorization") else 404, "RepoNotFound")
                    return None
                wanted = hub.gated.get(repo)
                if wanted and self.headers.get("Authorization") != f"Bearer {wanted}":
                    self._error(401, "GatedRepo")
                    return None
                return hub.repos[repo]

            def do_GET(self) -> None:
                self._serve(head=False)

            def do_HEAD(self) -> None:
                self._serve(head=True)

            def _serve(self, head: bool) -> None:
                path = self.path.split("?")[0]
                tree = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)/?", path)
                resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
                if tree:
                    files = self._repo(tree.group(1))
                    if files is None:
                        return
                    items = [{"type": "file", "path": name, "size": len(data),
                              "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(files.items())]
                    body = json.dumps(items).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif resolve:
                    files = self._repo(resolve.group(1))
                    if files is None:
                        return
                    name = resolve.group(3)
                    if name not in files:
                        self._error(404, "EntryNotFound")
                        return
                    self._file(resolve.group(1), name, files[name], head)
                else:
                    self._error(404, "NotFound")

            def _file(self, repo: str, name: str, data: bytes, head: bool) -> None:
                start = 0
                if not head and self.headers.get("Range"):
                    start = int(re.match(r"bytes=(\d+)-", self.headers["Range"]).group(1))
                if not head:
                    hub.downloads.append((f"{repo}/{name}", start))
                self.send_response(206 if start else 200)
                self.send_header("X-Repo-Commit", COMMIT)
                self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
                self.send_header("Content-Length", str(len(data) - start))
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                self.end_headers()
                if head:
                    return
                key = f"{repo}/{name}"
                if hub.cuts.get(key, 0) > 0:
                    hub.cuts[key] -= 1
                    self.wfile.write(data[start:start + (len(data) - start) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(data[start:])

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
