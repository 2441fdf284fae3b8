"""psdclip serve's processes: one (the app in this process) or N uvicorn workers agreeing on reloads through a run
folder (reload.py), each on its own GPU with `--device cuda`; a worker that cannot start stops the service with its
reason in one line. The address is checked before anything is announced."""
# no "from __future__ import annotations" needed: nothing here is read by FastAPI

import contextlib
import dataclasses
import gc
import json
import logging
import os
import signal

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from ..core.errors import InputError, PsdclipError
from ..core.io import write_json
from .config import ServeConfig
from .format import IndexInfo
from .reload import FAILED, RUN_DIR, worker_slot
from .service import create_app

log = logging.getLogger(__name__)


def _quiet_gc() -> None:
    gc.collect()
    gc.freeze()  # the loaded model, index metadata and app stay out of later collections: shorter GC pauses
    gc.set_threshold(50_000, 20, 100)  # requests make short-lived objects: collect young ones less often


class HeadTimeout(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline on every request head: a connection whose request line and headers
    have not all arrived `head_timeout` seconds after it opened (or after its last response) is closed, whatever it
    trickles meanwhile (slowloris: 200 connections that never finish their head were held for ever). The body has
    its own deadline (--body-timeout, fastpath.Guard); concurrent connections are bounded by --max-connections
    (uvicorn's limit_concurrency: 503 beyond)."""
    head_timeout = 10.0  # set from --head-timeout in each serving process (serve, worker_app)

    def connection_made(self, transport):
        super().connection_made(transport)
        self._head = None
        self._arm()

    def _arm(self):
        self._disarm()
        self._head = self.loop.call_later(self.head_timeout, self._late)

    def _disarm(self):
        if getattr(self, "_head", None) is not None:
            self._head.cancel()
            self._head = None

    def _late(self):
        self._head = None
        if not self.transport.is_closing():
            self.transport.close()

    def on_headers_complete(self):
        self._disarm()
        super().on_headers_complete()

    def on_response_complete(self):
        super().on_response_complete()
        if not self.transport.is_closing() and not self.pipeline:  # the next request's head: its own deadline
            self._arm()

    def connection_lost(self, exc):
        self._disarm()
        super().connection_lost(exc)


def uvicorn_options(cfg: ServeConfig) -> dict:
    """What every serving process gives uvicorn: the head deadline's protocol and the connection cap."""
    HeadTimeout.head_timeout = cfg.head_timeout
    return {"http": HeadTimeout, "limit_concurrency": cfg.max_connections, "log_level": "warning",
            "access_log": False}


def worker_app():
    """The app of one `psdclip serve --workers N` process (uvicorn's factory; the config comes from the parent).
    A worker that cannot start (a checkpoint that does not load, no memory) records why in the run folder and
    stops the parent, which shuts the service down and reports it in one line: uvicorn would otherwise start
    the worker again and again."""
    cfg = ServeConfig(**json.loads(os.environ["PSDCLIP_SERVE_CONFIG"]))
    uvicorn_options(cfg)  # (this worker's protocol reads its head deadline)
    cfg = dataclasses.replace(cfg, device=worker_device(cfg.device, worker_slot(os.environ[RUN_DIR]), _gpu_count()))
    try:
        app = create_app(cfg)
    except Exception as err:  # pylint: disable=broad-except
        message = str(err) if isinstance(err, PsdclipError) else f"{type(err).__name__}: {err}"
        with contextlib.suppress(OSError):
            write_json(os.path.join(os.environ[RUN_DIR], FAILED),
                       {"message": message, "input": isinstance(err, InputError)})
        os.kill(os.getppid(), signal.SIGTERM)  # uvicorn's supervisor: it stops the other workers and returns
        raise SystemExit(3) from None
    _quiet_gc()
    return app


def _check_port(host: str, port: int) -> None:
    """A one-line error before anything is loaded or announced when the address cannot be listened on (uvicorn
    would print its own error after our "serving ... on" line and exit 3)."""
    import socket

    if not port:
        return
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
            sock.bind((host, port))
    except OSError as err:
        raise InputError(f"--port {port}: cannot listen on {host}:{port} ({err.strerror or err})") from None


def worker_device(spec: str, slot: int, gpus: int) -> str:
    """The device of worker `slot`: `cuda` without an index spreads the workers over the GPUs (cuda:slot % gpus);
    a device named in full, or the CPU, is every worker's."""
    if spec == "cuda" and gpus > 0:
        return f"cuda:{slot % gpus}"
    return spec


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # pylint: disable=broad-except
        return 0


def serve(cfg: ServeConfig, announce=log.info) -> int:
    """Run the service until it is stopped; `announce(line)`: where the address it serves on is said."""
    import uvicorn

    _check_port(cfg.host, cfg.port)
    if cfg.workers == 1:
        app = create_app(cfg)
        _quiet_gc()
        announce(f"serving {', '.join(cfg.named())} on http://{cfg.host}:{cfg.port}")
        uvicorn.run(app, host=cfg.host, port=cfg.port, **uvicorn_options(cfg))
        return 0
    import shutil
    import socket
    import tempfile

    for path in cfg.named().values():  # a bad index or a missing checkpoint is one line here, not N workers failing
        info = IndexInfo.read(path)  # (index.json alone: the workers load the indices, and the GPUs)
        if info.checkpoint:
            info.check_checkpoint(path)
    if cfg.port == 0:
        with socket.socket() as sock:
            sock.bind((cfg.host, 0))
            cfg = dataclasses.replace(cfg, port=sock.getsockname()[1])
    run = tempfile.mkdtemp(prefix="psdclip-serve-")
    os.makedirs(os.path.join(run, "metrics"))
    os.environ.update({"PSDCLIP_SERVE_CONFIG": json.dumps(dataclasses.asdict(cfg)), RUN_DIR: run,
                       "PROMETHEUS_MULTIPROC_DIR": os.path.join(run, "metrics")})
    announce(f"serving {', '.join(cfg.named())} on http://{cfg.host}:{cfg.port} ({cfg.workers} worker processes)")
    try:
        uvicorn.run("psdclip.index.launch:worker_app", factory=True, workers=cfg.workers, host=cfg.host,
                    port=cfg.port, **uvicorn_options(cfg))
        failed = os.path.join(run, FAILED)
        if os.path.isfile(failed):
            with open(failed, encoding="utf-8") as f:
                why = json.load(f)
            raise (InputError if why["input"] else PsdclipError)(f"a worker could not start: {why['message']}")
    finally:
        shutil.rmtree(run, ignore_errors=True)
    return 0
