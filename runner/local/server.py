"""The local FireTitan-compatible service: one Starlette app on 127.0.0.1, run by uvicorn.

Where each endpoint lives:
- ``/v1/accounts/...`` (accounts, training shapes, trainer jobs, deployments,
  models, checkpoint promotion): ``control_plane.py``
- ``/training/v1/rlorTrainerJobs/{account}/{job}/api/v1/...`` (sessions, models,
  forward/backward, optimizer, saves/loads, futures): ``trainer_plane.py``
- ``/hot_load/v1/models/hot_load`` and ``/inference/v1/completions``: ``inference_plane.py``
- ``/api/v1/...`` (the Tinker client's wire, over the same engine and jobs): ``tinker_plane.py``
- ``/local/v1/...`` (service health and info, debug digests): here and in the planes.

Run it with ``python -m runner.local.server --state-dir DIR [--port N] [--device cpu|cuda]
[--model-dir [NAME=]DIR ...] [--log-requests]`` (a bearer token, if any, comes from
``FIRETITAN_LOCAL_TOKEN``);
``runner.local.supervisor`` starts it as a background process and ``firetitan-track local
up`` does so from the command line. The server writes ``<state-dir>/service.json``
(pid, port, base URL, default model, tokenizer, training shape) once it listens
and removes it on a clean shutdown; a lock file keeps a second server off the
same state dir.

Every request passes ``RequestGate`` first (``gate.py``): the optional bearer token, the
request log (each refused request, and with ``--log-requests`` every request with its
timing) and the guard that turns an unexpected exception into a 500 without dropping the
connection.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.routing import Route

from . import catalogue
from . import load_engine
from .control_plane import ControlPlane, default_training_shape
from .gate import RequestGate
from .inference_plane import InferencePlane
from .state import (DEFAULT_STATE_DIR, HF_CACHE_DIR, INFO_FILE, LOCK_FILE, TOKEN_ENV, ServiceState, read_json,
                    write_json_atomic)
from .tinker_plane import TinkerPlane, write_hf_cache
from .trainer_plane import TrainerPlane
from .wire import ApiError, error_response, json_response

log = logging.getLogger("runner.local.server")


# The checkpoint directories a state dir's service serves, as [[model name, directory],
# ...] with the default model first: kept so that a restart (`local up` again, or a
# runner starting the service) still knows the base models of the jobs it restores.
MODEL_DIRS_FILE = "model_dirs.json"


def register_model_dirs(state_dir: Path, model_dirs: dict[str, str]) -> str | None:
    """Serve the checkpoints in ``model_dirs`` and those remembered for ``state_dir``
    (``model_dirs`` win); remember them all. Returns the model to report as the default."""
    remembered = dict(read_json(state_dir / MODEL_DIRS_FILE) or [])
    served = {}
    for name, directory in {**model_dirs, **{k: v for k, v in remembered.items() if k not in model_dirs}}.items():
        try:
            catalogue.register(catalogue.load_model_dir(directory, name))
        except catalogue.ModelDirError as exc:
            if name in model_dirs:
                raise
            log.warning("no longer serving %s: %s", name, exc)  # e.g. the directory was removed
            continue
        served[name] = str(directory)
    if list(served.items()) != list(remembered.items()):
        write_json_atomic(state_dir / MODEL_DIRS_FILE, [list(pair) for pair in served.items()])
    return next(iter(served), None)


def service_info(state_dir: Path, port: int, device: str, base_model: str | None = None) -> dict:
    base_model = base_model or catalogue.DEFAULT_BASE_MODEL
    return {
        "base_url": f"http://127.0.0.1:{port}",
        "base_model": base_model,
        "tokenizer_path": catalogue.resolve(base_model).tokenizer_dir,
        "training_shape_id": default_training_shape(base_model),
        "model_dirs": {name: card.weights_dir for name, card in catalogue.BASE_MODELS.items() if card.weights_dir},
        "pid": os.getpid(),
        "port": port,
        "device": device,
        "state_dir": str(Path(state_dir).resolve()),
        "hf_hub_cache": str((Path(state_dir) / HF_CACHE_DIR).resolve()),
        "started_at": time.time(),
    }


def build_app(state_dir: Path, device: str = "cpu", info: dict | None = None, *, token: str | None = None,
              log_requests: bool = False) -> Starlette:
    state = ServiceState(state_dir)
    trainers = TrainerPlane(state, device)
    inference = InferencePlane(state, device)
    control = ControlPlane(state, trainers, inference)
    tinker = TinkerPlane(state, trainers, control, device)

    async def healthz(request: Request):
        return json_response({"status": "ok"})

    async def local_info(request: Request):
        return json_response(info or {})

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        control.restore()
        # Import torch/transformers in the background now, so the first
        # create_model does not pay for it while the client waits.
        threading.Thread(target=_warm_imports, name="warm-imports", daemon=True).start()
        yield
        trainers.stop_all()
        await inference.stop_all()
        await tinker.stop_all()

    async def api_error(request: Request, exc: ApiError):
        return error_response(exc.status, exc.message)

    async def http_error(request: Request, exc: HTTPException):
        return error_response(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")

    async def engine_error(request: Request, exc: catalogue.EngineError):
        return error_response(400, str(exc))

    # The planes' paths are disjoint, so the order only decides how many patterns a request is
    # tried against: the trainer data plane, which a training loop calls several times a step,
    # comes first.
    routes = [
        *trainers.routes(),
        Route("/local/v1/healthz", healthz, methods=["GET"]),
        Route("/local/v1/info", local_info, methods=["GET"]),
        *control.routes(),
        *inference.routes(),
        *tinker.routes(),
    ]
    # Unexpected exceptions are RequestGate's (a handler for Exception would run in Starlette's
    # outermost middleware, which re-raises after answering, and the server then drops the
    # client's kept-alive connection).
    app = Starlette(routes=routes, lifespan=lifespan,
                    middleware=[Middleware(RequestGate, token=token, log_requests=log_requests)],
                    exception_handlers={ApiError: api_error, HTTPException: http_error,
                                        catalogue.EngineError: engine_error})
    app.state.control, app.state.trainers, app.state.inference = control, trainers, inference
    app.state.tinker = tinker
    return app


def _warm_imports() -> None:
    try:
        load_engine()
    except Exception:  # the first request will report it properly
        log.exception("warming up imports failed")


def _take_lock(state_dir: Path):
    handle = open(state_dir / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        running = read_json(state_dir / INFO_FILE) or {}
        sys.exit(f"another local service already uses {state_dir} (pid {running.get('pid', '?')}, "
                 f"{running.get('base_url', 'unknown url')}); stop it with `firetitan-track local down`")
    return handle


def serve(state_dir: Path, port: int = 0, device: str = "cpu", log_level: str = "warning",
          model_dirs: dict[str, str] | None = None, log_requests: bool = False) -> None:
    import uvicorn

    state_dir.mkdir(parents=True, exist_ok=True)
    lock = _take_lock(state_dir)
    from .model import pick_device
    pick_device(device)  # fail now, not at the first request, if CUDA is asked for and absent
    try:
        base_model = register_model_dirs(state_dir, model_dirs or {})
    except catalogue.ModelDirError as exc:
        sys.exit(str(exc))

    # Bind first (port 0 = any free port), so the info file names the real port.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit this. Without it a response written as headers then
    # body waits on the client's delayed ACK (~40 ms) under Nagle's algorithm, on
    # every request of a kept-alive connection -- the future polls' latency floor.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(2048)
    port = sock.getsockname()[1]
    info = service_info(state_dir, port, device, base_model)
    write_hf_cache(Path(info["hf_hub_cache"]))
    token = os.environ.pop(TOKEN_ENV, "") or None  # read once; children of the server need not see it
    info["token_required"] = token is not None
    app = build_app(state_dir, device, info, token=token, log_requests=log_requests)

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_keep_alive=75,
                            timeout_graceful_shutdown=5, lifespan="on")
    server = uvicorn.Server(config)
    info_path = state_dir / INFO_FILE

    async def run() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started:
            write_json_atomic(info_path, info)
            log.warning("local service listening on %s (state dir %s, device %s)", info["base_url"], state_dir, device)
        await task

    try:
        asyncio.run(run())
    finally:
        current = read_json(info_path)
        if current and current.get("pid") == os.getpid():
            info_path.unlink(missing_ok=True)
        lock.close()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m runner.local.server", description=__doc__.split("\n")[0])
    parser.add_argument("--state-dir", default=DEFAULT_STATE_DIR, type=Path)
    parser.add_argument("--port", default=0, type=int)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--log-level", default=os.environ.get("FIRETITAN_LOCAL_LOG_LEVEL", "warning"))
    parser.add_argument("--model-dir", action="append", default=[], metavar="[NAME=]DIR",
                        help="serve the Hugging Face checkpoint in DIR as NAME (repeatable; the first is the default)")
    parser.add_argument("--log-requests", action="store_true",
                        help="log every request (method, path, status, time) to the output, not only refused ones")
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # SIGTERM from `local down`: uvicorn turns it into a graceful shutdown.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    model_dirs = {}
    for value in args.model_dir:
        name, directory = catalogue.parse_model_dir(value)
        try:
            model_dirs[name or catalogue.load_model_dir(directory).name] = directory
        except catalogue.ModelDirError as exc:
            sys.exit(str(exc))
    serve(args.state_dir, args.port, args.device, args.log_level, model_dirs, args.log_requests)


if __name__ == "__main__":
    main()
