"""Start the project's local MLflow UI or Prefect server, bound to 127.0.0.1 unless told otherwise.

From the repository root (or with --root)::

    python -m flows.local_servers mlflow        # MLflow UI for the tracking store, :5000
    python -m flows.local_servers prefect       # Prefect server (UI and API), :4200
    python -m flows.local_servers model         # the champion student, :5001, --workers N
                                                # processes (POST /invocations {"images":
                                                # [base64 JPEG/PNG]} or {"inputs": N x H x W x
                                                # C uint8}; docs/serving.md)
    python -m flows.local_servers mlflow-model  # the same model under `mlflow models serve`

Both listen on 127.0.0.1, reachable from this machine only: neither server has authentication,
and anyone who reaches MLflow can read or delete runs and models. To serve a trusted network,
pass --host (or set QUEST_SERVER_HOST), e.g. --host 0.0.0.0 for every interface.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
HOST_ENV = "QUEST_SERVER_HOST"
DEFAULT_PORTS = {"mlflow": 5000, "prefect": 4200, "model": 5001, "mlflow-model": 5001}
# What `model` serves: the registry alias `quest promote` moves.
CHAMPION = "models:/quest-student@champion"


def default_host() -> str:
    """The host servers bind to: $QUEST_SERVER_HOST, else 127.0.0.1 (this machine only)."""
    return os.environ.get(HOST_ENV) or DEFAULT_HOST


def server_command(
    kind: str, root: str | os.PathLike[str] = ".", host: str | None = None,
    port: int | None = None, workers: int = 1,
) -> list[str]:
    """The command line that starts the `kind` ('mlflow', 'prefect', 'model' or 'mlflow-model')
    server (`workers`: the model server's worker processes)."""
    if kind not in DEFAULT_PORTS:
        raise ValueError(f"unknown server '{kind}': choose one of {', '.join(DEFAULT_PORTS)}")
    host = host or default_host()
    port = port or DEFAULT_PORTS[kind]
    bindir = Path(sys.executable).parent
    # the same store `quest track` writes to (quest.apps.tracking.resolve_tracking_uri)
    uri = os.environ.get("MLFLOW_TRACKING_URI") or (
        f"sqlite:///{Path(root).resolve() / 'mlflow.db'}")
    if kind == "mlflow":
        return [str(bindir / "mlflow"), "ui", "--backend-store-uri", uri, "--host", host,
                "--port", str(port)]
    if kind == "model":
        # the registry's champion in a Starlette app: encoded images, class names, N workers
        return [sys.executable, "-m", "quest.apps.tracking.server", "--host", host, "--port",
                str(port), "--workers", str(workers), "--model-uri", CHAMPION]
    if kind == "mlflow-model":
        # --env-manager local: this environment already has what the model needs (torch, and
        # quest travels with the model), so nothing is installed and no network is used
        return [str(bindir / "mlflow"), "models", "serve", "-m", CHAMPION, "--env-manager",
                "local", "--host", host, "--port", str(port)]
    return [str(bindir / "prefect"), "server", "start", "--host", host, "--port", str(port)]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    """Replace this process with the chosen server."""
    ap = argparse.ArgumentParser(prog="python -m flows.local_servers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("kind", choices=sorted(DEFAULT_PORTS))
    ap.add_argument("--root", default=".", help="project root (holds mlflow.db)")
    ap.add_argument("--host", default=None,
                    help=f"interface to bind (default: ${HOST_ENV}, else {DEFAULT_HOST})")
    ap.add_argument("--port", type=int, default=None, help="port (mlflow 5000, prefect 4200)")
    ap.add_argument("--workers", type=int, default=1, help="model server worker processes")
    args = ap.parse_args(argv)
    cmd = server_command(args.kind, args.root, args.host, args.port, args.workers)
    host = cmd[cmd.index("--host") + 1]
    if not _is_loopback(host):
        print(f"warning: {args.kind} will listen on {host}, beyond this machine, without "
              "authentication", file=sys.stderr)
    os.chdir(args.root)
    env = dict(os.environ)
    if args.kind in ("model", "mlflow-model"):
        # mlflow models serve starts `uvicorn` by name: without an activated venv that is not on
        # PATH ("uvicorn: not found"), so the venv's bin goes first; the store is the project's
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.setdefault("MLFLOW_TRACKING_URI",
                       f"sqlite:///{Path(args.root).resolve() / 'mlflow.db'}")
    os.execve(cmd[0], cmd, env)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
