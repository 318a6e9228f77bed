"""What a run record needs to be rerun and compared: the machine, the threads, the code.

- `machine()`: the CPU model (with its family/model numbers and vector ISA: hypervisors often
  report only "AMD EPYC", which covers several microarchitectures), the GPU, the thread counts.
- `code_fingerprint()`: a hash of the training code, stable across checkouts (file contents by
  sorted relative path; no mtimes, no git needed), so a record can be checked against today's.
- `cpu_key(record)` / `fingerprint_of(record)`: the same facts read back from a record, older
  records included (their CPU name is in `device`; their fingerprint is unknown).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path
from typing import Any

import torch

PACKAGE = Path(__file__).resolve().parents[1]  # the quest package

# The code a run's numbers depend on: the whole core (models, data, losses, methods, training
# step, k-means) and the stage modules that drive it. The CLI, tracking, reports, tables and the
# study runner only orchestrate and record, so editing them does not make a record stale.
FINGERPRINT_PARTS = ("core", "apps/stages/common.py", "apps/stages/prepare.py",
                     "apps/stages/teacher.py", "apps/stages/features.py",
                     "apps/stages/codebook.py", "apps/stages/student.py")

UNKNOWN = "unknown"

# Code versions shown to train the same bits as an earlier one: refactors of the fingerprinted
# files that change no number. Each entry (new -> old) rests on a run of
# scripts/code_equivalence.py whose JSON is results/code-equivalence/<new>-<old>.json: every
# built-in method and a two-level QuEST, trained with both versions on the smoke preset, gave
# byte-identical weights and equal metrics. Tables and --reproduce treat such versions as one.
EQUIVALENT_CODE: dict[str, str] = {
    # 2026-12-07: one data interface, tap_shapes, build_distiller in methods, split functions
    "15a329b05e8793eb": "08e067efb3f417c3",
    # 2026-12-08: the loaders' shared Batching, one stream fault path, the ShuffleNets' stem
    "8885e287bfd6b912": "15a329b05e8793eb",
}

# ISA extensions that decide which float kernels oneDNN, OpenBLAS and FAISS pick.
_ISA_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni",
              "avx_vnni", "amx_tile")


def fingerprint_files(package: Path = PACKAGE) -> list[Path]:
    """The source files the fingerprint covers, sorted by their path inside the package."""
    files: list[Path] = []
    for part in FINGERPRINT_PARTS:
        p = package / part
        files += sorted(p.rglob("*.py")) if p.is_dir() else [p] if p.is_file() else []
    return sorted(set(files), key=lambda f: f.relative_to(package).as_posix())


def fingerprint_of_files(package: Path = PACKAGE) -> str:
    """sha256 (16 hex) over (relative path, content) of `fingerprint_files`; line endings are
    normalised so a Windows checkout of the same commit gives the same value."""
    h = hashlib.sha256()
    for f in fingerprint_files(package):
        content = f.read_bytes().replace(b"\r\n", b"\n")
        h.update(f.relative_to(package).as_posix().encode() + b"\0")
        h.update(hashlib.sha256(content).hexdigest().encode() + b"\n")
    return h.hexdigest()[:16]


@functools.lru_cache(maxsize=1)
def code_fingerprint() -> str:
    """The fingerprint of the training code this process runs (computed once per process)."""
    return fingerprint_of_files(PACKAGE)


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.split("\n\n")[0].splitlines():
        if ":" in line:
            key, value = line.split(":", 1)
            out[key.strip()] = value.strip()
    return out


def cpu_model() -> str:
    """The CPU's model name as the OS reports it (what `device` has always shown)."""
    return _cpuinfo().get("model name") or platform.processor() or platform.machine()


def faiss_threads() -> int | None:
    """FAISS's OpenMP thread count (its own runtime: torch.set_num_threads does not set it);
    None without FAISS."""
    try:
        import faiss
    except ImportError:
        return None
    return int(faiss.omp_get_max_threads())


def machine(device: torch.device | None = None) -> dict[str, Any]:
    """The hardware and thread counts a run used."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    out: dict[str, Any] = {
        "cpu": cpu_model(),
        # one name can cover several microarchitectures; family and model tell them apart
        "cpu_id": (f"{info.get('vendor_id', '?')} family {info.get('cpu family', '?')} "
                   f"model {info.get('model', '?')}" if info else UNKNOWN),
        "cpu_stepping": info.get("stepping"),
        "cpu_isa": [f for f in _ISA_FLAGS if f in flags],
        "cores": os.cpu_count(),
        "cores_usable": usable,  # a taskset or cgroup limit shows here, not in cores
        "torch_threads": torch.get_num_threads(),
        "faiss_threads": faiss_threads(),
        "gpu": (torch.cuda.get_device_name(device)
                if device is not None and device.type == "cuda" else None),
        "python": platform.python_version(),
        "numpy": __import__("numpy").__version__,
    }
    try:
        import faiss

        out["faiss"] = faiss.__version__
    except ImportError:
        out["faiss"] = None
    return out


def cpu_key(record: dict[str, Any]) -> str:
    """The processor a record ran on, for comparisons: the GPU's name on a GPU run, else the CPU
    model with its family/model numbers when recorded; older records give the name in their
    `device` ("cpu: AMD EPYC x2" -> "AMD EPYC"); "unknown" when neither is there."""
    m = record.get("machine") or {}
    if m.get("gpu"):
        return str(m["gpu"])
    if m.get("cpu"):
        cid = m.get("cpu_id")
        return f"{m['cpu']} ({cid})" if cid and cid != UNKNOWN else str(m["cpu"])
    device = str(record.get("device") or "")
    if device.startswith("cpu: "):
        name = device[len("cpu: "):]
        return name.rsplit(" x", 1)[0] if " x" in name else name
    return device or UNKNOWN


def cpu_name(record: dict[str, Any]) -> str:
    """The processor's name alone (without family/model numbers): comparable between older
    records and new ones."""
    return cpu_key(record).split(" (", 1)[0]


def fingerprint_of(record: dict[str, Any]) -> str:
    """The code fingerprint a record ran, or "unknown" (recorded before fingerprints)."""
    return str(record.get("code_fingerprint") or UNKNOWN)


def code_version(fingerprint: str) -> str:
    """The earliest fingerprint `fingerprint` is shown equivalent to (EQUIVALENT_CODE), itself
    when none: two records on one code version compare as one code."""
    seen = set()
    while fingerprint in EQUIVALENT_CODE and fingerprint not in seen:
        seen.add(fingerprint)
        fingerprint = EQUIVALENT_CODE[fingerprint]
    return fingerprint


def spans(records: list[dict[str, Any]]) -> list[str]:
    """What differs among `records` that should not: "cpu" when they ran on more than one CPU
    (or GPU) model, "code" when on more than one code fingerprint, "code?" when some fingerprint
    is unknown (older records). Empty: one processor model and one known code fingerprint."""
    out = []
    names = {cpu_name(r) for r in records}
    detailed = {cpu_key(r) for r in records if cpu_key(r) != cpu_name(r)}
    if len(names) > 1 or len(detailed) > 1:
        out.append("cpu")
    prints = {code_version(fingerprint_of(r)) for r in records}
    if len(prints - {UNKNOWN}) > 1:
        out.append("code")
    elif UNKNOWN in prints:
        out.append("code?")
    return out
