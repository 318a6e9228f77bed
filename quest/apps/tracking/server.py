"""The champion over HTTP for people: encoded images in, class names with probabilities out.

`mlflow models serve` answers about 100 images/s whatever the batch, an order of magnitude
below the model: its JSON body carries every pixel as an integer (3,072 per 32 x 32 image) and
its pandas/schema path runs per request (docs/serving.md has the measurements). This small
Starlette app keeps the MLflow registry as the source of the model: each worker loads
``models:/quest-student@champion`` (or $QUEST_MODEL_URI) with ``mlflow.pyfunc.load_model`` and
calls the registered model's own decoding and preprocessing (quest/apps/tracking/pyfunc_model.py).

    POST /invocations  {"images": ["<base64 JPEG/PNG>", ...], "top_k": 5}
                       {"inputs": [[[[r, g, b], ...]]]}     uint8 N x H x W x C, as before
    -> 200 {"predictions": [[{"class": "cat", "probability": 0.91}, ...], ...]}
       ("probabilities": the full N x classes rows too, for "inputs" or "probabilities": true)
    -> 400 {"error": "expected ..."} for a malformed body
    GET /ping, /health -> 200 once the model is loaded

Run it with `make serve WORKERS=4` (python -m flows.local_servers model --workers 4).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

MODEL_URI_ENV = "QUEST_MODEL_URI"
CHAMPION = "models:/quest-student@champion"
MAX_TOP_K = 100


def load_classifier(uri: str | None = None) -> Any:
    """The registered model's QuestImageClassifier, loaded through the MLflow registry."""
    import mlflow.pyfunc

    loaded = mlflow.pyfunc.load_model(uri or os.environ.get(MODEL_URI_ENV) or CHAMPION)
    return loaded.unwrap_python_model()


def answer(model: Any, body: Any) -> dict[str, Any]:
    """The response to one parsed request body (ValueError: a malformed request, 400)."""
    if not isinstance(body, dict) or ("images" in body) == ("inputs" in body):
        raise ValueError('expected a JSON object with "images": [base64 JPEG/PNG, ...] or '
                         '"inputs": uint8 N x H x W x C')
    top_k = body.get("top_k", 5)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f'expected "top_k" to be an integer from 1 to {MAX_TOP_K}')
    if "images" in body:
        probs = model.predict_encoded(body["images"])
    else:
        probs = model.predict(None, body["inputs"])
    out: dict[str, Any] = {"predictions": model.top_k(probs, top_k)}
    if body.get("probabilities") or "inputs" in body:  # tensor clients read the full rows
        out["probabilities"] = probs.round(6).tolist()
    return out


def create_app() -> Any:
    """The Starlette app (a factory: each uvicorn worker process loads the model once)."""
    import torch
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    # workers are processes: one intra-op thread each keeps them from oversubscribing cores
    torch.set_num_threads(int(os.environ.get("QUEST_SERVE_THREADS", "1")))
    model = load_classifier()

    async def ping(request: Request) -> Response:
        return Response("\n", media_type="text/plain")

    async def invocations(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body is not JSON: expected {\"images\": "
                                 "[base64 JPEG/PNG, ...]}"}, status_code=400)
        try:
            out = await run_in_threadpool(answer, model, body)
        except ValueError as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)
        return JSONResponse(out)

    return Starlette(routes=[Route("/ping", ping), Route("/health", ping),
                             Route("/invocations", invocations, methods=["POST"])])


def serve(host: str, port: int, workers: int = 1, uri: str | None = None) -> None:
    """Run the app under uvicorn with `workers` processes (blocks until SIGINT or SIGTERM).

    The model is loaded once, here, and the workers are forked from this process onto one
    listening socket: no worker spends its start-up importing MLflow and loading the model
    (uvicorn's own --workers supervisor restarts a worker that does not answer its health check
    within seconds, which a busy machine loading torch can miss over and over)."""
    import signal
    import socket

    import uvicorn

    if uri:
        os.environ[MODEL_URI_ENV] = uri
    app = create_app()
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    config = uvicorn.Config(app, log_level="warning", access_log=False)
    if workers <= 1 or not hasattr(os, "fork"):
        uvicorn.Server(config).run(sockets=[sock])
        return
    children = []
    for _ in range(workers):
        pid = os.fork()
        if pid == 0:  # a worker: serve until told to stop, never return into the parent's code
            code = 0
            try:
                uvicorn.Server(config).run(sockets=[sock])
            except BaseException:  # noqa: BLE001 (the worker's end, whatever it was)
                code = 1
            os._exit(code)
        children.append(pid)

    def stop(signum: int, frame: Any) -> None:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for pid in children:
        while True:
            try:
                os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break


def encode_images(images: np.ndarray, fmt: str = "PNG") -> list[str]:
    """uint8 N x H x W x C images as base64 strings of `fmt` files (what clients send)."""
    import base64
    import io

    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(buf, format=fmt)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: serve the champion (or --model-uri) on --host:--port with --workers."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m quest.apps.tracking.server", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5001)
    ap.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--model-uri", default=None, help=f"default: ${MODEL_URI_ENV} or {CHAMPION}")
    args = ap.parse_args(argv)
    serve(args.host, args.port, args.workers, args.model_uri)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
