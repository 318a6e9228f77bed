"""The Prefect tasks' cache keys: they live in quest/apps/stages/keys.py, which `quest run` shares
(it skips a stage whose recorded key still matches); this module keeps the old import path."""

from quest.apps.stages.keys import (  # noqa: F401
    CACHE_SCHEMA,
    VOLATILE_KEYS,
    cache_key_fn,
    code_files,
    code_version,
    file_digest,
    input_digest,
    output_digests,
    outputs_match,
    outputs_present,
    stage_code,
    stage_config,
    stage_inputs,
    stage_key,
    stage_key_for,
    stage_outputs,
    tree_digest,
)
