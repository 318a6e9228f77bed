#!/usr/bin/env bash
# The GPU check, one command on a GPU machine (about 5-10 minutes on an H100/H200):
#   1. the tests marked `cuda` (tests/test_cuda.py: the CUDA paths against their CPU twins);
#   2. `quest bench` on cuda with bf16 autocast and torch.compile, k-means on the GPU (FAISS GPU
#      where installed, else the torch backend);
#   3. a short QuEST student on CIFAR-10 (the main job's data, 2 epochs, bf16, channels_last).
# Results: benchmarks/results/bench-cuda.json (bench + student + test outcome), plus the
# bench's own bench-<gpu>.json. Fails at once, loudly, on a machine without a CUDA GPU.
#
# Works with the venv (make setup) or a bare Python that has torch, torchvision, numpy and
# pyyaml (the lent GPU machine's Python 3.12): wheels for pydantic (the typed settings), pytest
# (and faiss) are installed from $WHEELS (default .whl/, git-ignored) when missing; fill it on a
# machine with the registry: pip download pydantic==2.14.4 pytest --python-version 3.12
# --only-binary=:all: -d .whl Data and teacher: QUEST_DATA_LOCATION and
# QUEST_TEACHER_CHECKPOINT, default ../shared/... as in params.yaml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
WHEELS=${WHEELS:-.whl}
OUT=benchmarks/results
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} DO_NOT_TRACK=true PYTHONUNBUFFERED=1
# absolute: the student run below has its own root, which relative paths would be read against
export QUEST_DATA_LOCATION=${QUEST_DATA_LOCATION:-$PWD/../shared/data/cifar10-jpeg.tar.gz}
export QUEST_TEACHER_CHECKPOINT=${QUEST_TEACHER_CHECKPOINT:-$PWD/../shared/models/resnet56-cifar10-jpeg.pth}

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_check: no CUDA GPU visible to $PY (torch.cuda.is_available() is False): run this on a GPU machine" >&2
  exit 1
fi
for pkg in pydantic pytest; do
  if ! "$PY" -c "import $pkg" 2>/dev/null; then
    [ -d "$WHEELS" ] || { echo "gpu_check: $pkg is missing and $WHEELS/ holds no wheels: pip download $pkg --python-version 3.12 --only-binary=:all: -d $WHEELS" >&2; exit 1; }
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" "$pkg"
  fi
done
if ! "$PY" -c "import faiss" 2>/dev/null && ls "$WHEELS"/faiss* >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" faiss-cpu || true
fi
mkdir -p "$OUT"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

echo "== 1/3 tests marked cuda"
set +e
"$PY" -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider | tee "$work/tests.txt"
tests_rc=${PIPESTATUS[0]}
set -e

echo "== 2/3 quest bench on cuda (bf16, compile)"
"$PY" -m quest bench --quick --out-dir "$work/bench" --set runtime.device=cuda \
  --set runtime.amp=bf16 --set runtime.compile=true --set codebook.backend=auto \
  --set codebook.k=1024   # the step goal's vocabulary (the main job's default is 256)

echo "== 3/3 a short QuEST student on CIFAR-10 (cuda, bf16, channels_last)"
"$PY" -m quest run --no-validate --root "$work/run" --params "$PWD/params.yaml" \
  --set runtime.device=cuda --set runtime.amp=bf16 --set runtime.channels_last=true \
  --set "student.methods=[quest]" --set student.train.epochs=2 | tee "$work/run.txt"

"$PY" - "$work" "$OUT" "$tests_rc" <<'PYEOF'
import json, sys, time
from pathlib import Path
work, out, tests_rc = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
(bench_file,) = sorted((work / "bench").glob("bench-*.json"))
bench = json.loads(bench_file.read_text())
(out / bench_file.name).write_text(json.dumps(bench, indent=2) + "\n")
student = json.loads((work / "run" / "metrics" / "students" / "quest.json").read_text())
summary = {
    "check": "scripts/gpu_check.sh", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    "tests": {"returncode": tests_rc,
              "summary": (work / "tests.txt").read_text().strip().splitlines()[-1]},
    "bench": bench,
    "student": {k: student[k] for k in ("method", "arch", "epochs", "top1", "top5", "seconds")},
    "student_history": student["history"],
}
(out / "bench-cuda.json").write_text(json.dumps(summary, indent=2) + "\n")
print(f"wrote {out / 'bench-cuda.json'} and {out / bench_file.name}")
PYEOF
if [ "$tests_rc" -ne 0 ]; then
  echo "gpu_check: tests marked cuda failed (exit $tests_rc)" >&2
  exit "$tests_rc"
fi
echo "gpu_check: passed"
