"""Model registry: log quest model files as pyfunc models, register and tag versions, aliases."""

from __future__ import annotations

import importlib.metadata
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from quest.infra.errors import QuestError

TEACHER_MODEL = "quest-teacher"
STUDENT_MODEL = "quest-student"
CHALLENGER = "challenger"
CHAMPION = "champion"
# Fallback when the quest distribution is not installed (code used straight from a checkout);
# kept equal to pyproject.toml's core dependencies.
CORE_REQUIREMENTS = [
    "torch==2.14.1",
    "torchvision==0.29.1",
    "numpy==2.4.6",
    "pillow==13.0.0",
    "pyyaml==6.0.3",
    "tqdm==4.70.1",
]
# The logged model's code: MLflow runs it at load time, with the shipped quest package on sys.path.
MODEL_SCRIPT = """\
import mlflow.models

from quest.apps.tracking.pyfunc_model import QuestImageClassifier

mlflow.models.set_model(QuestImageClassifier())
"""


def quest_package_dir() -> Path:
    """The directory of the `quest` package (shipped with every model via code_paths)."""
    import quest

    return Path(quest.__file__).resolve().parent


def pip_requirements() -> list[str]:
    """Pinned requirements of a logged model: quest's core dependencies plus mlflow itself."""
    import mlflow

    try:
        reqs = [
            r for r in importlib.metadata.requires("quest-distill") or [] if ";" not in r
        ] or CORE_REQUIREMENTS
    except importlib.metadata.PackageNotFoundError:
        reqs = CORE_REQUIREMENTS
    # given explicitly, so MLflow does not spend seconds inferring them from a test load
    return [*reqs, f"mlflow=={mlflow.__version__}"]


def image_signature(height: int, width: int, channels: int, num_classes: int) -> Any:
    """Tensor signature: uint8 N x H x W x C images in, float32 N x num_classes out."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    # unnamed tensors: the model receives a plain array, not a dict of named inputs
    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, height, width, channels))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, num_classes))]),
    )


def example_images(prepared_dir: Path, n: int = 2) -> np.ndarray:
    """A few raw test images, uint8 N x H x W x C, for the logged input example."""
    from quest.core.data.prepared import META_FILE, load_prepared
    from quest.core.data.stream import FORMAT, open_stream
    from quest.infra.io_utils import read_json

    try:
        meta_path = Path(prepared_dir) / META_FILE
        meta = read_json(meta_path) if meta_path.is_file() else {}
        if isinstance(meta, dict) and meta.get("format") == FORMAT:
            images, _ = open_stream(Path(prepared_dir), meta).sample_images("test", n)
        else:
            images = np.asarray(load_prepared(prepared_dir, mmap=True).test.images[:n])
    except QuestError as exc:
        raise QuestError(f"an input example needs the prepared data: {exc}") from None
    # the prepared format is N x C x H x W; models take what a camera gives, channels last
    return np.ascontiguousarray(images.transpose(0, 2, 3, 1))


def log_and_register(
    model_file: Path,
    registered_name: str,
    example: np.ndarray,
    num_classes: int,
    tags: dict[str, Any],
) -> int:
    """Log `model_file` as a pyfunc model in the active run, register it, tag it; its version."""
    import tempfile

    import mlflow

    from quest.apps.tracking.pyfunc_model import MODEL_FILE_ARTIFACT

    if not model_file.is_file():
        raise QuestError(f"{model_file} does not exist: run the stage that makes it first")
    _, h, w, c = example.shape
    with tempfile.TemporaryDirectory(prefix="quest-pyfunc-") as tmp, warnings.catch_warnings():
        # MLflow nags about missing predict type hints; the explicit signature is the contract
        warnings.filterwarnings("ignore", message=".*type hints to the `predict` method")
        # models-from-code: the model is this script plus the quest package, not a pickle
        script = Path(tmp) / "quest_pyfunc.py"
        script.write_text(MODEL_SCRIPT, encoding="utf-8")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(script),
            artifacts={MODEL_FILE_ARTIFACT: str(model_file)},
            code_paths=[str(quest_package_dir())],
            pip_requirements=pip_requirements(),
            signature=image_signature(h, w, c, num_classes),
            input_example=example,
            # the input size encoded images are resized to (pyfunc_model.decode)
            model_config={"image_size": [int(h), int(w)], "crop_ratio": 1.0},
            registered_model_name=registered_name,
        )
    version = int(info.registered_model_version)
    client = mlflow.MlflowClient()
    for key, value in tags.items():
        client.set_model_version_tag(registered_name, str(version), key, str(value))
    return version


def version_tags(client: Any, name: str, version: int) -> dict[str, str]:
    """The tags of one model version (QuestError if it does not exist)."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(client.get_model_version(name, str(version)).tags)
    except MlflowException:
        raise QuestError(
            f"model {name} has no version {version}: list versions in the MLflow UI"
        ) from None


def alias_version(client: Any, name: str, alias: str) -> int | None:
    """The version an alias points to, or None when the alias (or the model) does not exist."""
    from mlflow.exceptions import MlflowException

    try:
        return int(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def set_alias(client: Any, name: str, alias: str, version: int) -> None:
    """Point `alias` of registered model `name` at `version`."""
    client.set_registered_model_alias(name, alias, str(version))
