"""MLflow adapter: track a finished pipeline, register its models, promote with a gate.

Importing this package does not import or configure MLflow; every function does so when called.
"""

from quest.apps.tracking.mlflow_log import resolve_tracking_uri, track_pipeline
from quest.apps.tracking.promotion import promote

__all__ = ["promote", "resolve_tracking_uri", "track_pipeline"]
