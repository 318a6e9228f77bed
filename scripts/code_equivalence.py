"""Do two versions of quest's training code train the same bits? (docs/provenance.md)

A refactor of quest/core or the stage modules changes the code fingerprint every record carries,
so the tables would mark records of the old and the new code as different code. This trains the
`smoke` preset with every built-in method and a two-level QuEST, on one thread, once with each
tree's code (same params.yaml: NEW's), and compares the students' weights byte for byte and
their metrics exactly. Where every one is identical, the pair may be declared equivalent in
quest/apps/provenance.py (EQUIVALENT_CODE), with this script's JSON as the evidence:

    .venv/bin/python scripts/code_equivalence.py --old /path/to/old/checkout --new .

Writes results/code-equivalence/<new fingerprint>-<old fingerprint>.json; exit 1 when any
student differs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

METHODS = ["ce", "kd", "quest", "quest+kd", "fitnet", "at", "dkd", "crd"]
TWO_LEVEL = "{l2: {teacher_layer: layer2, student_layer: layer2}}"


def fingerprint(tree: Path) -> str:
    """The code fingerprint of a checkout's quest package."""
    return subprocess.run([sys.executable, "-c", "from quest.apps.provenance import "
                           "code_fingerprint; print(code_fingerprint())"],
                          env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree.parent,
                          check=True, capture_output=True, text=True).stdout.strip()


def train(tree: Path, params: Path, shared: Path, root: Path, extra: list[str]) -> None:
    """Run the smoke pipeline up to the students with `tree`'s code into `root`."""
    root.mkdir(parents=True)
    shutil.copy(params, root / "params.yaml")
    sets = [f"data.location={shared / 'data' / 'cifar10-jpeg.tar.gz'}",
            f"teacher.checkpoint={shared / 'models' / 'resnet56-cifar10-jpeg.pth'}",
            "runtime.threads=1", *extra]
    cmd = [sys.executable, "-m", "quest", "run", "--preset", "smoke", "--root", str(root)]
    for s in sets:
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(tree), "DO_NOT_TRACK": "1"}
    # cwd outside both trees: `python -m` puts the working directory first on sys.path
    subprocess.run(cmd, env=env, cwd=root, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)


def weights_sha256(path: Path) -> str:
    """sha256 over every tensor of a model file (name, dtype, shape, bytes), in key order: the
    file's other fields (paths, times) do not enter."""
    import torch

    h = hashlib.sha256()

    def walk(prefix: str, obj: object) -> None:
        if isinstance(obj, torch.Tensor):
            t = obj.detach().cpu().contiguous()
            h.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.view(torch.int16)
                     .numpy().tobytes())
        elif isinstance(obj, dict):
            for k in sorted(obj, key=str):
                walk(f"{prefix}.{k}", obj[k])

    walk("", torch.load(path, map_location="cpu", weights_only=True))
    return h.hexdigest()


def students(root: Path) -> dict[str, dict[str, object]]:
    """Each student's weights hash and metrics (top-1, val top-1, per-epoch history)."""
    out = {}
    for f in sorted((root / "models" / "students").glob("*.pt")):
        m = json.loads((root / "metrics" / "students" / f"{f.stem}.json").read_text())
        # every number of the history but the clock's (epoch seconds, images per second)
        hist = [{k: v for k, v in row.items() if k != "seconds" and not k.endswith("_per_s")}
                for row in m.get("history", [])]
        out[f.stem] = {"weights_sha256": weights_sha256(f), "top1": m.get("top1"),
                       "val_top1": m.get("val_top1"), "history": hist}
    return out


def main() -> int:
    """Train both trees, compare, write the JSON."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, type=Path)
    p.add_argument("--new", default=Path("."), type=Path)
    p.add_argument("--shared", type=Path, default=None,
                   help="folder with data/ and models/ (default: ../shared beside --new)")
    a = p.parse_args()
    new, old = a.new.resolve(), a.old.resolve()
    shared = (a.shared or new.parent / "shared").resolve()
    runs = {"methods": [f"student.methods=[{','.join(METHODS)}]"],
            "two-level": ["student.methods=[quest]",
                          f"student.quest.extra_levels={TWO_LEVEL}"]}
    got: dict[str, dict[str, dict[str, object]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tree in (("old", old), ("new", new)):
            for run, extra in runs.items():
                root = Path(tmp) / label / run
                train(tree, new / "params.yaml", shared, root, extra)
                for name, facts in students(root).items():
                    got.setdefault(f"{run}:{name}", {})[label] = facts
    same = {k: v.get("old") == v.get("new") and v.get("old") is not None for k, v in got.items()}
    for k, v in got.items():
        if not same[k]:
            fields = [f for f in v.get("new", {}) if v.get("old", {}).get(f) != v["new"][f]]
            print(f"{k}: differs in {', '.join(fields) or 'presence'}", file=sys.stderr)
    fp_old, fp_new = fingerprint(old), fingerprint(new)
    report = {"old": fp_old, "new": fp_new, "preset": "smoke", "threads": 1,
              "identical": all(same.values()), "students": same,
              "command": "scripts/code_equivalence.py --old OLD --new NEW",
              "details": {k: v["new"] for k, v in got.items() if "new" in v}}
    for v in report["details"].values():
        v.pop("history", None)
    out = new / "results" / "code-equivalence" / f"{fp_new}-{fp_old}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(".tmp")
    tmp_out.write_text(json.dumps(report, indent=1) + "\n")
    tmp_out.replace(out)
    print(f"{fp_old} -> {fp_new}: {'identical' if report['identical'] else 'DIFFERENT'} "
          f"({sum(same.values())} of {len(same)} students); {out}")
    return 0 if report["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
