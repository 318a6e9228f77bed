"""QuEST: knowledge distillation through a quantized embedding space of teacher features.

The package is three layers, each a folder, each importing only the ones below it
(tests/test_layering.py enforces the order):

- `quest.infra`: errors, settings (pydantic), paths, atomic files, progress and run locks;
- `quest.core`: the training core (models, data, losses, methods, codebook, engine,
  checkpoints): torch, torchvision and numpy, plus the settings;
- `quest.apps`: what users run (stages, the CLI, studies, benchmarks, reports, tracking,
  validation), where MLflow, Great Expectations and matplotlib load.
"""

__version__ = "0.1.0"
