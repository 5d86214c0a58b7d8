"""The HTTP side: what clients talk to.

The accept loop, the proxied hot path and the views, who may use them (keys, CORS, TLS), and
what a waiting or finished request is told or counted from (loading feedback, token usage). It
asks the supervisor for backends and never starts one; it imports ``routerd.backends``,
``routerd.models`` and the core modules, never ``routerd.ops``.
"""
