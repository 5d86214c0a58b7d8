"""Running backends: the llama-server processes and the decisions about them.

One process per ``Backend`` (spawn without orphans, readiness, its HTTP/1.1 pool, stop), the
memory budget and the admission plan that decide what may be resident, the per-model queues and
failure history, and the ``Supervisor`` that owns them all. Nothing here speaks HTTP to clients
or JSON-RPC; it imports ``routerd.models`` and the core modules only.
"""
