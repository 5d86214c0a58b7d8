"""HTTPS for the HTTP front: the certificate in use, and replacing it without a restart.

Owns building the TLS context from ``server.certfile`` / ``server.keyfile`` (hypercorn's
settings: TLS 1.2 or later, ALPN for HTTP/2 and HTTP/1.1) and swapping it on SIGHUP: a renewed
certificate applies to every connection opened after the reload, and a broken one is refused
with the running one kept. It must not know about requests or routes.
"""

from __future__ import annotations

import ssl

import hypercorn.config

from routerd.config import ServerConfig
from routerd.errors import ConfigError


def load_context(certfile: str, keyfile: str) -> ssl.SSLContext:
    """A server context for the pair; ConfigError naming what is wrong with it."""
    settings = hypercorn.config.Config()
    settings.certfile, settings.keyfile = certfile, keyfile
    try:
        context = settings.create_ssl_context()
    except FileNotFoundError as exc:
        raise ConfigError([f"server.certfile/keyfile: {exc.filename}: no such file"], "TLS") from None
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError([f"server.certfile/keyfile: cannot use {certfile} with {keyfile}: {exc}"], "TLS") from None
    assert context is not None, "certfile and keyfile are both set"
    return context


class Certificates:
    """The TLS context new connections use now (None: plain HTTP)."""

    def __init__(self, server: ServerConfig) -> None:
        self.enabled = bool(server.certfile)
        self.context: ssl.SSLContext | None = self.prepare(server)

    def prepare(self, server: ServerConfig) -> ssl.SSLContext | None:
        """The context ``server`` asks for, without using it yet: the caller sets ``context``
        once everything else in a reload checked out. ConfigError when the pair is broken, or
        when it would switch HTTPS on or off (clients know the listener by its scheme)."""
        if bool(server.certfile) != self.enabled:
            raise ConfigError([f"server.certfile: switching HTTPS {'off' if self.enabled else 'on'} needs a "
                               "restart (systemctl restart routerd)"], "TLS")
        return load_context(server.certfile, server.keyfile) if server.certfile else None

    def current(self) -> ssl.SSLContext | None:
        return self.context
