"""Gated promotion: move the `champion` alias to a candidate only if it is strictly better on
the validation split (its val_top1 tag); test accuracy is reported, never read here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from quest.infra.errors import QuestError


def _val_top1(tags: dict[str, str], name: str, version: int, required: bool = True
              ) -> float | None:
    """A version's val_top1 tag; a candidate without one is an error, a champion without one
    (registered before the validation split) gives None."""
    try:
        return float(tags["val_top1"])
    except (KeyError, ValueError):
        if not required:
            return None
        raise QuestError(
            f"{name} version {version} has no numeric val_top1 tag (registered without a "
            "validation split): train with data.validation_per_class > 0 and register it with "
            "quest track") from None


def _existing_store(tracking_uri: str | None) -> str:
    """The tracking URI to use; a SQLite store that does not exist yet is an error (opening
    it would create an empty one)."""
    from quest.apps.tracking.mlflow_log import resolve_tracking_uri, sqlite_path

    uri = resolve_tracking_uri(Path.cwd(), tracking_uri)
    db = sqlite_path(uri)
    if db is not None and not db.is_file():
        raise QuestError(f"no MLflow database at {db}: run `quest track` first "
                         "(or pass --tracking-uri)")
    return uri


def promote(
    tracking_uri: str | None = None,
    min_top1: float = 0.0,
    model_name: str = "quest-student",
    version: int | None = None,
) -> dict[str, Any]:
    """Make `version` (default: the challenger) champion if its validation top-1 beats the
    champion's and clears min_top1. A champion registered before the validation split (no
    val_top1 tag) is replaced by any candidate that clears min_top1."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from quest.apps.tracking.mlflow_log import using_tracking_uri
    from quest.apps.tracking.registry import (
        CHALLENGER,
        CHAMPION,
        alias_version,
        set_alias,
        version_tags,
    )

    uri = _existing_store(tracking_uri)
    with using_tracking_uri(uri):
        client = mlflow.MlflowClient()
        try:
            client.get_registered_model(model_name)
        except MlflowException:
            raise QuestError(
                f"no registered model '{model_name}' in {uri}: run `quest track` first "
                "(or pass --tracking-uri)"
            ) from None
        if version is None:
            version = alias_version(client, model_name, CHALLENGER)
            if version is None:
                raise QuestError(f"{model_name} has no '{CHALLENGER}' alias: run `quest track` "
                                 "first or pass --version")
        candidate = _val_top1(version_tags(client, model_name, version), model_name, version)
        assert candidate is not None
        champion = alias_version(client, model_name, CHAMPION)
        champ_top1 = (
            _val_top1(version_tags(client, model_name, champion), model_name, champion,
                      required=False)
            if champion is not None else None
        )
        out: dict[str, Any] = {"promoted": False, "version": version,
                               "previous_champion": champion, "val_top1": candidate,
                               "champion_val_top1": champ_top1, "model_name": model_name}
        refusal = _refusal(version, candidate, champion, champ_top1, min_top1)
        if refusal:
            out["reason"] = refusal
            return out
        set_alias(client, model_name, CHAMPION, version)
        client.set_model_version_tag(model_name, str(version), "promoted_from",
                                     str(champion) if champion is not None else "none")
        out["promoted"] = True
        out["reason"] = _promotion_reason(version, candidate, champion, champ_top1, min_top1)
        return out


def _promotion_reason(version: int, candidate: float, champion: int | None,
                      champ_top1: float | None, min_top1: float) -> str:
    """Why the candidate became champion, in one line."""
    if champion is None:
        why = f"version {version} val_top1 {candidate:.4f} is the first champion"
    elif champ_top1 is None:
        why = (f"version {version} val_top1 {candidate:.4f} replaces champion version "
               f"{champion}, which has no val_top1 (registered before the validation split)")
    else:
        why = (f"version {version} val_top1 {candidate:.4f} beats champion version "
               f"{champion} ({champ_top1:.4f})")
    return why + f" and clears min_top1 {min_top1:.4f}"


def _refusal(version: int, candidate: float, champion: int | None, champ_top1: float | None,
             min_top1: float) -> str | None:
    """Why the candidate may not become champion, or None when it may."""
    if champion == version:
        return f"version {version} is already the champion"
    if candidate < min_top1:
        return f"version {version} val_top1 {candidate:.4f} is below min_top1 {min_top1:.4f}"
    if champ_top1 is not None and not candidate > champ_top1:
        return (f"version {version} val_top1 {candidate:.4f} does not beat "
                f"champion version {champion} ({champ_top1:.4f})")
    return None
