"""Starting the serve app on this machine's Ray (or the cluster `ray.address` names).

`start_local(run_dir, cfg, port=None)` returns a `ServeHandle` (a context manager) once `/health`
answers: `.url` is the OpenAI base URL (`http://HOST:PORT/v1`), `.model_ids` the ids served then
(new variant folders appear later on their own). `port=None` takes `serve.port`; `port=0` picks a
free port. The HTTP proxy binds `serve.host`, 127.0.0.1 unless told otherwise; binding every
interface (0.0.0.0 / ::) logs a warning, and then an API key is strongly advised.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ga_ray.config import RunConfig
from ga_ray.errors import StageError

log = logging.getLogger("ga_ray.serve")

ALL_INTERFACES = ("0.0.0.0", "::", "[::]")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host.strip("[]"), 0))
        return int(s.getsockname()[1])


def public_bind_warning(host: str) -> str | None:
    """The warning printed when the server would be reachable from the network."""
    if host in ALL_INTERFACES:
        return (f"serving on {host}: every network interface, reachable from other machines. "
                f"Set an API key (--api-key or the serve.api_key_env variable) or bind 127.0.0.1")
    return None


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ALL_INTERFACES else host


@dataclass
class ServeHandle:
    """A running serve app; `shutdown()` (or leaving the `with` block) stops it."""

    url: str
    host: str
    port: int
    model_ids: list[str]
    api_key: str | None = None
    _owns_ray: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def root(self) -> str:
        return self.url[: -len("/v1")]

    def get_json(self, path: str, timeout: float = 30.0) -> Any:
        req = urllib.request.Request(self.root + path)
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read())

    def refresh_model_ids(self) -> list[str]:
        self.model_ids = [m["id"] for m in self.get_json("/v1/models")["data"]]
        return self.model_ids

    def shutdown(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        import ray
        from ray import serve

        try:
            serve.shutdown()
        finally:
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()

    def __enter__(self) -> ServeHandle:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def _wait_healthy(root: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(root + "/health", timeout=10) as r:
                if r.status == 200:
                    return
        except urllib.error.HTTPError as exc:
            last = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last = str(exc)
        time.sleep(0.25)
    raise StageError(f"the serve app did not become healthy at {root}/health within {timeout_s:.0f} s ({last}); "
                     f"see the Ray logs under /tmp/ray/session_latest/logs/serve/")


def start_local(run_dir: str | Path, cfg: RunConfig, port: int | None = None, *, host: str | None = None,
                api_key: str | None = None, timeout_s: float = 300.0) -> ServeHandle:
    """Deploy the serve app for `run_dir` and wait until it answers (see the module docstring).

    `api_key`: None reads the environment variable `serve.api_key_env` (no key when unset or empty).
    Starts a local Ray when none is initialised (and stops it on shutdown); an initialised Ray is
    used as it is. Serve's HTTP proxy keeps the host/port it was first started with in a Ray session.
    """
    import ray
    from ray import serve

    from ga_ray.raycluster import init_ray
    from ga_ray.serve.app import APP_NAME, application

    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise StageError(f"run directory {run_dir} does not exist: run `ga-ray demo` or `ga-ray run` first")
    host = host or cfg.serve.host
    port = cfg.serve.port if port is None else int(port)
    if port == 0:
        port = free_port(_client_host(host))
    if api_key is None and cfg.serve.api_key_env:
        api_key = os.environ.get(cfg.serve.api_key_env) or None
    warning = public_bind_warning(host)
    if warning:
        log.warning(warning)
    owns = not ray.is_initialized()
    if owns:
        init_ray(cfg.ray)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application(run_dir, cfg, api_key=api_key), name=APP_NAME, route_prefix="/")
        root = f"http://{_client_host(host)}:{port}"
        _wait_healthy(root, timeout_s)
        handle = ServeHandle(url=root + "/v1", host=host, port=port, model_ids=[], api_key=api_key, _owns_ray=owns)
        handle.refresh_model_ids()
        return handle
    except BaseException:
        try:
            serve.shutdown()
        finally:
            if owns:
                ray.shutdown()
        raise
