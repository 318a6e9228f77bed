"""The training core imports only torch, torchvision and numpy (plus stdlib, Pillow, PyYAML)."""

from __future__ import annotations

import subprocess
import sys

OUTER = ("mlflow", "prefect", "dvc", "great_expectations", "pandas", "faiss",
         "matplotlib")


def test_core_and_stages_import_without_outer_layers() -> None:
    code = (
        "import sys\n"
        "import quest, quest.cli, quest.engine, quest.distill, quest.losses, quest.codebook\n"
        "import quest.stages.pipeline, quest.models, quest.data\n"
        f"bad = [m for m in {OUTER!r} if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
