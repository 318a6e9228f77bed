"""Prefect orchestration of the quest pipeline: cached stage tasks, promotion, deployments."""
