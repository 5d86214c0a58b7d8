"""Models on disk: what routerd can serve.

The catalog (names, aliases, files, groups), how models are found (folders, the Hugging Face
cache, imports), their GGUF headers, and downloads. Nothing here starts a process or knows
about requests; it imports only routerd's core modules.
"""
