"""Load test of the served champion: N concurrent clients on 127.0.0.1 for a bounded time.

Starts the model server (``quest``: python -m quest.apps.tracking.server with --workers, what
`make serve` runs; or ``mlflow``: `mlflow models serve`, for comparison) on a free port of
127.0.0.1 against a project's MLflow store, or uses --url of one already running. Each client
thread keeps one HTTP connection and posts batches of --batch test images, encoded as JPEG
(base64, {"images": [...]}; ``mlflow`` takes the pixels as JSON integers, the only input it
has), as fast as answers come, for --seconds. Every answer is checked (status 200 and one
prediction per image) and after the load a set of malformed bodies must each get a 400.

The same model is then timed in this process (``mlflow.pyfunc.load_model``, uint8 batches of
--batch, all of this machine's threads): the served images/s as a share of that is the number
the serving path is judged by. Writes benchmarks/results/serve_load[-<server>].json with p50,
p95 and p99 latency, images/s, errors, the in-process images/s and the machine.

    python benchmarks/serve_load.py --root . --clients 8 --seconds 60 --batch 16 --workers 2
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CHAMPION = "models:/quest-student@champion"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_images(root: Path, n: int) -> np.ndarray:
    """n uint8 N x H x W x C test images of the project's prepared data (repeated if fewer)."""
    images = np.load(root / "data" / "prepared" / "test_images.npy", mmap_mode="r")
    idx = np.arange(n) % len(images)
    return np.ascontiguousarray(np.asarray(images[idx]).transpose(0, 2, 3, 1))


def jpeg_b64(images: np.ndarray, quality: int = 95) -> list[str]:
    """Each image as a base64 JPEG (what a client holding photos sends)."""
    from PIL import Image

    out = []
    for img in images:
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=quality)
        out.append(base64.b64encode(buf.getvalue()).decode("ascii"))
    return out


def machine() -> dict[str, Any]:
    """What ran it: the CPU, versions and torch threads (quest bench's record of the machine)."""
    import torch

    from quest.apps.bench import machine_info

    return {**machine_info(torch.device("cpu")), "torch_threads": torch.get_num_threads(),
            "load_average": list(os.getloadavg())}


def in_process(uri: str, images: np.ndarray, seconds: float) -> dict[str, Any]:
    """images/s of the registered model's predict on uint8 batches (and on encoded images),
    with one intra-op thread and with torch's default; the best is the reference (on a busy
    machine the default's spinning threads can be far slower than one)."""
    import mlflow.pyfunc
    import torch

    model = mlflow.pyfunc.load_model(uri)
    inner = model.unwrap_python_model()
    encoded = jpeg_b64(images)
    default = torch.get_num_threads()
    out: dict[str, Any] = {"by_threads": {}}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        row = {}
        for name, fn in (("uint8", lambda: model.predict(images)),
                         ("encoded", lambda: inner.predict_encoded(encoded))):
            fn()  # warm-up
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                n += len(images)
            row[f"images_per_s_{name}"] = round(n / (time.perf_counter() - t0), 1)
        out["by_threads"][str(threads)] = row
    torch.set_num_threads(default)
    for name in ("uint8", "encoded"):
        out[f"images_per_s_{name}"] = max(r[f"images_per_s_{name}"]
                                          for r in out["by_threads"].values())
    return out


def _post(conn: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    conn.request("POST", "/invocations", body=body,
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def load(host: str, port: int, body: bytes, batch: int, clients: int,
         seconds: float) -> dict[str, Any]:
    """`clients` threads posting `body` for `seconds`: latencies, answers, errors."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = time.perf_counter() + seconds

    def client() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=120)
        mine: list[float] = []
        bad: list[str] = []
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            try:
                status, data = _post(conn, body)
                ok = status == 200 and len(json.loads(data)["predictions"]) == batch
                if not ok:
                    bad.append(f"{status}: {data[:200]!r}")
            except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
                bad.append(repr(exc))
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=120)
                continue
            mine.append(time.perf_counter() - t0)
        conn.close()
        with lock:
            latencies.extend(mine)
            errors.extend(bad)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = np.array(latencies) * 1000
    return {
        "requests": len(latencies), "errors": len(errors), "error_samples": errors[:5],
        "wall_s": round(wall, 1),
        "images_per_s": round(len(latencies) * batch / wall, 1),
        "latency_ms": {q: round(float(np.percentile(lat, int(q[1:]))), 1) if lat.size else None
                       for q in ("p50", "p95", "p99")},
    }


def malformed(host: str, port: int, images: np.ndarray) -> dict[str, int]:
    """The status of each malformed body (all must be 400)."""
    h, w = images.shape[1:3]
    bodies = {
        "not json": b"{oops",
        "float pixels": json.dumps({"inputs": (images[:1] / 255.0).tolist()}).encode(),
        "one channel": json.dumps({"inputs": images[:1, :, :, :1].tolist()}).encode(),
        "wrong size": json.dumps({"inputs": np.zeros((1, h + 3, w, 3), int).tolist()}).encode(),
        "bad base64": json.dumps({"images": ["@@not base64@@"]}).encode(),
        "not an image": json.dumps({"images": [base64.b64encode(b"text").decode()]}).encode(),
        "wrong key": json.dumps({"pixels": [1]}).encode(),
    }
    out = {}
    conn = http.client.HTTPConnection(host, port, timeout=60)
    for name, body in bodies.items():
        out[name], _ = _post(conn, body)
    conn.close()
    return out


def start_server(kind: str, root: Path, port: int, workers: int, uri: str) -> subprocess.Popen:
    """The model server as a child process on 127.0.0.1:port."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": os.environ.get(
        "MLFLOW_TRACKING_URI", f"sqlite:///{root.resolve() / 'mlflow.db'}")}
    if kind == "quest":
        cmd = [sys.executable, "-m", "quest.apps.tracking.server", "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers), "--model-uri", uri]
    else:
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        cmd = [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", uri,
               "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
               "--workers", str(workers)]
    return subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def wait_ready(port: int, proc: subprocess.Popen | None, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"the server exited with {proc.returncode} while starting")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/ping")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"no answer on 127.0.0.1:{port}/ping in {timeout:.0f}s")


def main(argv: list[str] | None = None) -> int:
    """Run the load test and write its JSON; print the summary."""
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=".", help="project root (mlflow.db, data/prepared)")
    ap.add_argument("--model-uri", default=CHAMPION)
    ap.add_argument("--server", choices=("quest", "mlflow"), default="quest")
    ap.add_argument("--url", default=None, help="an already running server (host:port)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--inproc-seconds", type=float, default=10)
    ap.add_argument("--out", default=None, help="result JSON (default benchmarks/results/...)")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    images = test_images(root, args.batch)
    if args.server == "quest":
        body = json.dumps({"images": jpeg_b64(images), "top_k": 5}).encode()
    else:
        body = json.dumps({"inputs": images.tolist()}).encode()
    proc = None
    if args.url:
        host, port = args.url.rsplit(":", 1)[0], int(args.url.rsplit(":", 1)[1])
    else:
        host, port = "127.0.0.1", _free_port()
        proc = start_server(args.server, root, port, args.workers, args.model_uri)
    try:
        wait_ready(port, proc)
        _post(http.client.HTTPConnection(host, port, timeout=120), body)  # warm every path
        served = load(host, port, body, args.batch, args.clients, args.seconds)
        refused = malformed(host, port, images) if args.server == "quest" else {}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    local = in_process(args.model_uri, images, args.inproc_seconds)
    result = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "python benchmarks/serve_load.py " + " ".join(argv or sys.argv[1:]),
        "server": args.server, "workers": args.workers, "clients": args.clients,
        "seconds": args.seconds, "batch": args.batch,
        "request_format": "base64 JPEG" if args.server == "quest" else "JSON integer pixels",
        "body_bytes": len(body), "served": served, "malformed_status": refused,
        "in_process": local,
        "served_share_of_in_process": round(served["images_per_s"]
                                            / local["images_per_s_uint8"], 3),
        "machine": machine(),
    }
    out = Path(args.out) if args.out else RESULTS / (
        "serve_load.json" if args.server == "quest" else "serve_load-mlflow.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps({k: result[k] for k in ("served", "in_process",
                                             "served_share_of_in_process",
                                             "malformed_status")}, indent=2))
    print(f"wrote {out}")
    return 0 if served["errors"] == 0 and all(s == 400 for s in refused.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
