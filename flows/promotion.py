"""Gated promotion as a Prefect flow: move the MLflow `champion` alias only to a better model."""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.pipeline import retry_unless_quest_error


# Never cached: the registry changes between runs. A registry that is briefly unreachable is
# retried; a QuestError (no such model, no challenger, a tag missing) is not.
@task(name="promote", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2,
      retry_condition_fn=retry_unless_quest_error)
def promote_task(min_top1: float, tracking_uri: str | None, model_name: str) -> dict[str, Any]:
    """Call quest.apps.tracking.promotion.promote and return its decision."""
    # imported here so that the pipeline flow never needs MLflow
    from quest.apps.tracking.promotion import promote

    return promote(tracking_uri=tracking_uri, min_top1=min_top1, model_name=model_name)


@flow(name="quest-promotion")
def quest_promotion(
    min_top1: float = 0.0,
    tracking_uri: str | None = None,
    model_name: str = "quest-student",
) -> dict[str, Any]:
    """Promote the registered challenger to champion if its validation top-1 beats the
    champion's and clears min_top1."""
    decision = promote_task(min_top1, tracking_uri, model_name)
    get_run_logger().info("promotion: %s", decision.get("reason"))
    return decision
