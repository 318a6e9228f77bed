"""`quest init DIR [--preset NAME]`: a project of one's own, outside the repository.

It writes params.yaml (the active configuration, from a packaged preset when one is named, with
the data and teacher keys to fill in commented one by one), dvc.yaml (from the stage table),
prefect.yaml (the pipeline flow of the installed quest), .gitignore, .dvcignore, a README and
models/levels/ (an empty folder every student stage depends on). Nothing in it refers back to
the repository: `quest run`, `dvc repro` and the Prefect flow work there with quest installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quest.infra.config import Config, build_config, resolve_raw
from quest.infra.errors import QuestError
from quest.infra.io_utils import write_text_atomic

# where the data goes unless the preset says otherwise (the schema's default is the repository's
# shared archive, which a project elsewhere does not have)
DATA_PLACEHOLDER = "data/raw/images"

# one comment per data and teacher key: what to fill in and what the choices are
DATA_COMMENTS = {
    "source": "image_folder (folder or .tar.gz with train/<class>/* and test/<class>/*) "
              "| cifar10 | cifar100",
    "location": "FILL IN: the image folder, archive or shard folder (relative to this folder)",
    "image_size": "null: keep the images' own size (all must match); N: resize to N x N",
    "channels": "3: grayscale replicated to RGB; 1: everything to gray",
    "on_corrupt": "skip (and count) or fail on unreadable images",
    "download": "cifar10/cifar100: let torchvision download them (needs network)",
    "mean": "null: computed from the prepared training split",
    "std": "null: computed from the prepared training split",
    "padding": "random-crop padding in pixels (training augmentation)",
    "padding_mode": "constant (zeros) | reflect",
    "flip": "random horizontal flips in training",
    "loader": "memory (batched tensors) | dataloader (per-sample, big data)",
    "format": "prepared (decoded once into memory) | stream (folders/shards, big data)",
    "workers": "stream: DataLoader worker processes per rank",
    "crop_scale_min": "stream training: RandomResizedCrop's smallest area share",
    "eval_crop_ratio": "stream evaluation: resize to image_size / ratio, center-crop",
    "shuffle_buffer": "stream shards: samples mixed across shards in each worker",
    "subset": "images per class to use (null: all of them)",
    "validation_per_class": "held-out training images per class that every choice reads "
                            "(0: none)",
    "validation_seed": "the validation draw's own seed",
}
TEACHER_COMMENTS = {
    "arch": "the teacher network (`quest models` lists the zoo)",
    "checkpoint": "FILL IN: a trained teacher's .pth (relative to this folder), or null to train "
                  "it here with teacher.train",
    "train": "the teacher's training recipe (used only when checkpoint is null)",
}

GITIGNORE = """\
# outputs DVC tracks (dvc push / dvc pull carry them) and local state
/data/prepared/
/data/features/
/data/levels/
/models/teacher/
/models/codebook/
/models/students/
/models/levels/*/
/metrics/
/plots/
/reports/
/results/runs/
/mlflow.db
/mlruns/
/dvc_plots/
.quest/
logs/
__pycache__/
"""

DVCIGNORE = """\
# Paths DVC never looks at
__pycache__/
.quest/
logs/
mlruns/
mlflow.db
"""

PREFECT_YAML = """\
# Prefect deployments of this project, for `prefect --no-prompt deploy --all` run here; the flow
# is the installed quest's (flows.pipeline), a worker runs it with this folder as the root.
name: {name}
prefect-version: {prefect_version}

build: null
push: null
pull: null

deployments:
  - name: nightly
    description: The QuEST pipeline, nightly; unchanged stages are cache hits.
    entrypoint: flows.pipeline.quest_pipeline
    tags: [quest]
    parameters:
      root: "."
      params: params.yaml
      track: true          # log recomputed runs to MLflow and register the models
    schedules:
      - cron: "0 2 * * *"
        timezone: UTC
        active: true
    concurrency_limit: 1   # two runs must not write the same root at once
    work_pool:
      name: quest-process
      work_queue_name: default
"""

README = """\
# {name}

A QuEST knowledge-distillation project made by `quest init`{preset_note}.

1. Edit `params.yaml`: the lines marked FILL IN say where the images are (`data.location`) and
   which teacher to distill (`teacher.checkpoint`, or null to train one here first).
2. Run the pipeline, either directly or through DVC (versioned outputs, reruns only what changed):

       quest run                        # every stage in order; a second run resumes
       git init && dvc init && dvc repro

3. Results: `metrics/evaluation.json` (top-1 of every student), `reports/`, `models/students/`.
   With Prefect: `prefect --no-prompt deploy --all` (prefect.yaml) or
   `python -m flows.pipeline --root .`.

Official QuEST configurations: `quest init DIR --preset NAME` (an unknown name lists them).
"""


def _flow(value: Any) -> str:
    """`value` as one line of YAML (JSON is YAML; strings stay bare where YAML allows)."""
    import yaml

    text = yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=10_000).strip()
    return text.removesuffix("\n...").strip()


def _commented(name: str, values: dict[str, Any], comments: dict[str, str]) -> list[str]:
    """A section with each key and its comment: on the key's line when both fit in 100
    characters, else on the line above; a long nested mapping in block style under its key."""
    lines = [f"{name}:"]
    for key, value in values.items():
        entry = f"  {key}: {_flow(value)}"
        nested = isinstance(value, dict) and len(entry) > 70
        if nested:
            entry = f"  {key}:"
        note = comments.get(key, "")
        if note and len(f"{entry:<34} # {note}") <= 100:
            lines.append(f"{entry:<34} # {note}")
        else:
            lines += [f"  # {note}", entry] if note else [entry]
        if nested:
            lines += ["    " + line for line in _block(value)]
    return lines


def _block(values: dict[str, Any]) -> list[str]:
    """The other sections in block style, innermost mappings inline: short and diff-friendly."""
    import yaml

    return yaml.safe_dump(values, sort_keys=False, default_flow_style=None,
                          width=100).splitlines()


def params_text(cfg: Config, preset: str | None) -> str:
    """params.yaml for a new project: every setting (dvc.yaml's stages list them), the data and
    teacher sections first with a comment on each key."""
    from quest.core.methods import config_dict

    resolved = config_dict(cfg)
    origin = f"the preset {preset}" if preset else "quest's defaults"
    head = [
        "# The active configuration of this project: `quest run` and `dvc repro` read it.",
        f"# Written by `quest init` from {origin}.",
        "# Fill in the data and teacher keys marked FILL IN; every key is described in quest's",
        "# docs (docs/configuration.md). Relative paths are relative to this folder. `presets:`",
        "# holds your own named overrides (--preset NAME); they win over the official presets",
        "# packaged with quest of the same name.",
        "",
    ]
    rest = {k: v for k, v in resolved.items() if k not in ("data", "teacher")}
    lines = [*head, *_commented("data", resolved["data"], DATA_COMMENTS),
             "", *_commented("teacher", resolved["teacher"], TEACHER_COMMENTS), "",
             "# Features, codebook, students, runtime, gates: quest's defaults"
             + (f" with preset '{preset}'" if preset else "") + ".",
             *_block(rest), "", "presets: {}", ""]
    return "\n".join(lines)


def init_project(directory: str | Path, preset: str | None = None,
                 force: bool = False) -> list[Path]:
    """Write a new project into `directory` (created if missing; an existing non-empty one only
    with `force`, which overwrites the files named here and keeps the rest). Returns the files."""
    root = Path(directory)
    if root.exists() and not root.is_dir():
        raise QuestError(f"{root} is a file: name a new or empty directory for quest init")
    if root.is_dir() and any(root.iterdir()) and not force:
        raise QuestError(f"{root} is not empty: name a new or empty directory, or pass --force "
                         "to overwrite quest's files there")
    raw = resolve_raw({}, preset)
    if "location" not in raw.get("data", {}):
        raw.setdefault("data", {})["location"] = DATA_PLACEHOLDER
    cfg = build_config(raw)
    files = {
        "params.yaml": params_text(cfg, preset),
        "dvc.yaml": _dvc_yaml(),
        "prefect.yaml": PREFECT_YAML.format(name=json.dumps(root.resolve().name),
                                            prefect_version=_prefect_version()),
        ".gitignore": GITIGNORE,
        ".dvcignore": DVCIGNORE,
        "README.md": README.format(name=root.resolve().name,
                                   preset_note=f" from the preset `{preset}`" if preset else ""),
        "models/levels/.gitkeep": "",
    }
    written = []
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, text)
        written.append(path)
    return written


def _dvc_yaml() -> str:
    from quest.apps.stages.dvc_file import project_dvc_yaml

    return project_dvc_yaml()


def _prefect_version() -> str:
    """The installed Prefect's version (the deployments' format), else the pinned one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("prefect")
    except PackageNotFoundError:
        return "3.9.1"
