"""``hrnetdet serve``'s HTTP side, built on LitServe: its inference worker processes (each builds
the model once, ``--workers`` of them per device), its request queue and its dynamic batching loop
(``--max-batch-size``, ``--batch-timeout``) run the model; this module replaces LitServe's routes
with the API of ``POST /predict``, ``/health``, ``/info``, ``/metrics`` and the page at ``/``.

Why these choices (over LitServe's ``LitServer.run``):
- One HTTP process, run by uvicorn in the main thread. Every request is checked, read and decoded
  here (``requests.py``; decoding in a thread pool) before it is queued: a refusal costs no model
  time and cannot fail a batch it would have joined (LitServe fails a whole batch on one error).
  The metrics are this one process's, so ``/metrics`` adds nothing up across processes.
- SIGTERM (or Ctrl-C) is uvicorn's graceful shutdown: the socket closes, the requests in flight
  get their answers from the still running workers, then the workers stop.
- The model lives in the workers only (``model.py``): one copy per worker, none in this process.
"""
import asyncio
import hmac
import json
import logging
import os
import signal
import socket
import time
from typing import Any, Dict, List, NamedTuple, Optional

from fastapi import FastAPI, HTTPException
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.staticfiles import StaticFiles

from ..version import __version__
from .metrics import Metrics
from .requests import (IMAGE_TYPES, RequestError, accepted_type, check_length, decode_upload, merge_options,
                       parse_body, parse_options, too_large)

STATIC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "static")
OPEN_ROUTES = ("/health", "/")  # and /static/*: the page must load to ask for the key
ROUTES = ("/predict", "/health", "/info", "/metrics", "/")
START_POLL_S = 0.05
DECODE_SLOTS = 4  # images decoded at once: bounds the memory of many large uploads arriving together


class Limits(NamedTuple):
    max_upload_bytes: int
    max_pixels: Optional[int]  # None: no limit


class Service:
    """The state the routes share: limits, key, metrics, the model's description (from a worker)."""

    def __init__(self, limits: Limits, api_key: Optional[str], base_options: Any):
        self.limits, self.api_key, self.base_options = limits, api_key, base_options
        self.metrics = Metrics()
        self.info: Dict[str, Any] = {}
        self.handler: Any = None  # LitServe's request handler: queue, wait, answer
        self.workers: List[Any] = []
        self.worker_status: Any = None
        self.decoding = asyncio.Semaphore(DECODE_SLOTS)

    def authorized(self, request: Request) -> bool:
        if not self.api_key:
            return True
        given = request.headers.get("x-api-key")
        bearer = request.headers.get("authorization", "")
        if given is None and bearer.lower().startswith("bearer "):
            given = bearer[7:].strip()
        return given is not None and hmac.compare_digest(given.encode(), self.api_key.encode())

    def ready(self) -> bool:
        from litserve.utils import WorkerSetupStatus

        statuses = dict(self.worker_status or {})
        return (bool(statuses) and all(s == WorkerSetupStatus.READY for s in statuses.values())
                and all(w.is_alive() for w in self.workers))


def error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def route_label(path: str) -> str:
    """A request's route for the metrics: a known route, /static, or "other" (bounded labels)."""
    if path in ROUTES:
        return path
    return "/static" if path.startswith("/static/") else "other"


async def read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it passes ``limit`` bytes: a body without a length, or
    longer than it said, is never held whole."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


async def answer_predict(service: Service, request: Request) -> Response:
    limits = service.limits
    content_type = request.headers.get("content-type")
    accepted_type(content_type)
    check_length(request.headers.get("content-length"), limits.max_upload_bytes)
    upload = parse_body(content_type, await read_body(request, limits.max_upload_bytes))
    checked = parse_options(merge_options(dict(request.query_params), upload.options), service.base_options,
                            service.info.get("masks", False))
    async with service.decoding:
        image = await run_in_threadpool(decode_upload, upload.data, limits.max_pixels)
    try:
        answer = await service.handler.handle_request({"image": image, "options": checked.options,
                                                       "masks": checked.masks}, dict)
    except HTTPException as e:
        return error(e.status_code, "the model failed on this image (see the server's log)"
                     if e.status_code == 500 else str(e.detail))
    service.metrics.batch(answer["batch_size"])
    return JSONResponse(answer["response"])


def info_record(service: Service) -> Dict[str, Any]:
    """``GET /info``: the model's description, the server's default options (its --score-thresh and
    --max-det, else the model's) and the input contract."""
    limits, base = service.limits, service.base_options
    defaults = service.info.get("options", {})
    options = {"score_thresh": defaults.get("score_thresh") if base.score_thresh is None else base.score_thresh,
               "max_det": defaults.get("max_det") if base.max_det is None else base.max_det}
    return {**{k: v for k, v in service.info.items() if k != "min_side"}, "options": options, "version": __version__,
            "input": {"formats": list(IMAGE_TYPES), "bodies": ["multipart/form-data (file field 'image')",
                                                              "image/*", "application/json (base64 'image')"],
                      "max_upload_mb": limits.max_upload_bytes / 2 ** 20, "max_pixels": limits.max_pixels or 0,
                      "min_side": service.info.get("min_side", 1)}}


def add_routes(app: FastAPI, service: Service) -> None:
    """The API on ``app`` (LitServe's own routes removed first), errors as ``{"error": ...}``."""
    app.router.routes = [r for r in app.router.routes if getattr(r, "path", None) not in ROUTES]

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        start = time.perf_counter()
        path = request.url.path
        if path in OPEN_ROUTES or path.startswith("/static/") or service.authorized(request):
            response = await call_next(request)
        else:
            missing = not (request.headers.get("x-api-key") or request.headers.get("authorization"))
            response = error(401, "this server needs an API key: send it as the header X-API-Key"
                             if missing else "wrong API key")
        service.metrics.request(route_label(path), response.status_code, time.perf_counter() - start)
        return response

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        message = {404: f"not found: {request.url.path}", 405: f"{request.method} is not allowed on "
                   f"{request.url.path}"}.get(e.status_code, str(e.detail))
        return error(e.status_code, message)

    @app.exception_handler(RequestError)
    async def refused(request: Request, e: RequestError) -> Response:
        return error(e.status, e.message)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        return await answer_predict(service, request)

    @app.get("/health")
    async def health() -> Response:
        if service.ready():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "unavailable", "error": "an inference worker is not running"},
                            status_code=503)

    @app.get("/info")
    async def info() -> Response:
        return JSONResponse(info_record(service))

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/")
    async def page() -> Response:
        index = os.path.join(STATIC, "index.html")
        if not os.path.isfile(index):
            return error(404, "this installation has no web page (hrnetdet/serve/static/index.html); "
                              "the API is at POST /predict")
        return FileResponse(index)

    if os.path.isdir(STATIC):  # the page's files (installed with the package); without them, /static/* is a 404
        app.mount("/static", StaticFiles(directory=STATIC), name="static")


class ServerError(RuntimeError):
    """The server could not start: a worker failed to build the model (the message says why)."""


def wait_for_workers(server: Any, report_path: str) -> Dict[str, Any]:
    """Block until every inference worker has built its model; the model's description from the
    report a worker wrote, or ServerError with the reason one of them gave."""
    from litserve.utils import WorkerSetupStatus

    while True:
        statuses = dict(server.workers_setup_status)
        failed = any(s == WorkerSetupStatus.ERROR for s in statuses.values())
        if failed or not all(w.is_alive() for w in server.inference_workers):
            raise ServerError(_read_report(report_path).get("error", "an inference worker stopped while starting"))
        if statuses and all(s == WorkerSetupStatus.READY for s in statuses.values()):
            return _read_report(report_path)["info"]
        time.sleep(START_POLL_S)


def _read_report(path: str) -> Dict[str, Any]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def run_server(api: Any, service: Service, *, host: str, port: int, accelerator: str, devices: Any,
               workers: int, report_path: str, on_ready: Any = print) -> None:
    """Serve until SIGTERM or Ctrl-C: workers up, routes in place, uvicorn in this thread; on the way
    out the requests in flight are answered before the workers stop."""
    import litserve as ls
    import uvicorn
    from litserve.server import RegularRequestHandler

    logging.getLogger("litserve").setLevel(logging.WARNING)  # its start and stop notes: ours are one line
    sock = listening_socket(host, port)  # before the workers start: a taken port is refused at once
    server = ls.LitServer(api, accelerator=accelerator, devices=devices, workers_per_device=workers,
                          timeout=REQUEST_TIMEOUT_S, disable_openapi_url=True)
    add_routes(server.app, service)
    manager = server._init_manager(1)
    server.inference_workers = server.launch_inference_worker(api)
    try:
        service.info = wait_for_workers(server, report_path)
        service.workers, service.worker_status = server.inference_workers, server.workers_setup_status
        service.handler = RegularRequestHandler(api, server)
        server.app.response_queue_id = 0
        config = uvicorn.Config(server.app, host=host, port=port, log_level="warning",
                                timeout_graceful_shutdown=GRACEFUL_S)
        uvicorn_server = uvicorn.Server(config)
        signal.signal(signal.SIGTERM, _exit)  # uvicorn drains on SIGTERM, then raises it again: we exit
        asyncio.run(_serve(uvicorn_server, sock, lambda: on_ready(service.info, sock.getsockname()[1])))
    finally:
        server._perform_graceful_shutdown(manager, {}, "normal")
        sock.close()


REQUEST_TIMEOUT_S = 120  # a request queued longer than this is answered 504
GRACEFUL_S = 60  # on SIGTERM, in-flight requests get this long to finish


def _exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def listening_socket(host: str, port: int) -> socket.socket:
    """The server's socket, bound: OSError naming the address when it is taken or not this machine's."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    return sock


async def _serve(uvicorn_server: Any, sock: socket.socket, on_ready: Any) -> None:
    """uvicorn's serve on ``sock``, with ``on_ready`` called once it listens."""
    task = asyncio.create_task(uvicorn_server.serve(sockets=[sock]))
    while not uvicorn_server.started and not task.done():
        await asyncio.sleep(START_POLL_S)
    if uvicorn_server.started:
        on_ready()
    await task
