"""A kneurons explorer served from a thread on a free loopback port, and a small JSON client (tests only)."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request


class Served:
    """``create_app(handle, runs_dir)`` served by uvicorn in a daemon thread until :meth:`stop`."""

    def __init__(self, handle, runs_dir=None):
        import uvicorn

        from kneurons.server import bind, create_app, url_of

        self.handle = handle
        self.app = create_app(handle, runs_dir)
        self.sock = bind("127.0.0.1", 0)
        self.url = url_of(self.sock)
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", access_log=False, lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.02)

    @property
    def explorer(self):
        return self.app.state.explorer

    def call(self, path: str, body=None, raw: bytes | None = None, timeout: float = 120):
        """``(status, decoded JSON or text)`` of GET ``path`` (no body) or POST ``body`` (JSON) / ``raw``."""
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path.lstrip("/"), data=data, method="GET" if data is None else "POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as res:
                status, text, ctype = res.status, res.read().decode(), res.headers.get("content-type", "")
        except urllib.error.HTTPError as exc:
            status, text, ctype = exc.code, exc.read().decode(), exc.headers.get("content-type", "")
        return status, (json.loads(text) if "json" in ctype else text)

    def ok(self, path: str, body=None):
        status, out = self.call(path, body)
        assert status == 200, (path, status, out)
        return out

    def wait_job(self, job: dict, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while job["state"] in ("queued", "running"):
            assert time.time() < deadline, job
            time.sleep(0.05)
            job = self.ok(f"/api/jobs/{job['id']}")
        return job

    def stop(self):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
