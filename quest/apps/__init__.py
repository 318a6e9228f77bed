"""Applications: the pipeline's stages, the CLI, studies, benchmarks, reports, tracking and
validation. The outer libraries (MLflow, Prefect-facing code, GX, matplotlib) load here."""
