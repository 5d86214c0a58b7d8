"""Operations: running routerd as a service.

The ``routerd`` command, the daemon's wiring and shutdown order, signals and systemd
notifications, the control socket, logging and the request log, and metrics. The top of the
import graph: it may import every other layer, and nothing imports it.
"""
