"""``kneurons serve``: a local web explorer over the library (the top layer; nothing imports it).

:func:`create_app` builds the FastAPI application for one loaded model; :func:`serve` runs it with uvicorn on a
socket bound beforehand (so that the command can refuse a busy port before the model loads). Needs the ``serve``
extra (``pip install 'kneurons[serve]'``: fastapi, uvicorn).
"""

from __future__ import annotations

import socket

from ..errors import KneuronsError

__all__ = ["create_app", "bind", "serve", "check_installed"]


def check_installed() -> None:
    """A one-line error when the web framework is missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise KneuronsError(f"kneurons serve needs the 'serve' extra ({exc.name} is not installed): "
                            "pip install 'kneurons[serve]'") from None


def bind(host: str, port: int) -> socket.socket:
    """A listening TCP socket on ``host:port`` (port 0: any free port), or a one-line error."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise KneuronsError(f"cannot resolve host {host!r} ({exc})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise KneuronsError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/"


def create_app(handle, runs_dir=None):
    from .app import create_app as _create

    return _create(handle, runs_dir)


def serve(app, sock: socket.socket, log_level: str = "warning") -> None:
    """Serve ``app`` on ``sock`` until Ctrl-C / SIGTERM (uvicorn shuts down gracefully, then re-raises the
    signal as the process's own handler sees it)."""
    import uvicorn

    # requests still waiting for the model get 5 s after Ctrl-C; an attribution job (a daemon thread) ends with us
    config = uvicorn.Config(app, log_level=log_level, access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    uvicorn.Server(config).run(sockets=[sock])
