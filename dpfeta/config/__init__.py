"""Typed configuration: YAML -> frozen dataclasses, ``--set a.b=c`` overrides, validation.

The config is the single description of a run. Every key is declared in ``schema`` with its type and
default; an unknown key, a value of the wrong type, or an inconsistent combination is a
``ValueError``/``TypeError`` naming the dotted key, raised before any data is read.

``schema`` (the dataclasses, the value sets, the secret and infrastructure keys, ``Config``'s views,
``is_uri``), ``loader`` (files, overrides, coercion: ``load``, ``replace``), ``checks`` (``validate``, one
function per section, and ``validate_against_n``). Callers import from ``dpfeta.config``.
"""

from __future__ import annotations

from dpfeta.config.checks import validate, validate_against_n
from dpfeta.config.loader import from_dict, from_public_dict, load, parse_override, replace
from dpfeta.config.schema import (
    ACCOUNTANTS,
    COMPILE_MODES,
    INFRA_KEYS,
    INIT_MODES,
    PLACEMENTS,
    PRECISIONS,
    RANDAUG_OPS,
    RENAMED_KEYS,
    SAMPLERS,
    SECRET_KEYS,
    SEED_REDACTED,
    SOURCES,
    STAGE_PLACEMENTS,
    TUNE_MODES,
    CentralConfig,
    Config,
    DataConfig,
    DiffusionConfig,
    EvalConfig,
    FidConfig,
    FinetuneConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    SampleConfig,
    TrackingConfig,
    TuneConfig,
    WarmupConfig,
    is_uri,
)

__all__ = [
    "ACCOUNTANTS",
    "COMPILE_MODES",
    "INFRA_KEYS",
    "INIT_MODES",
    "PLACEMENTS",
    "PRECISIONS",
    "RANDAUG_OPS",
    "RENAMED_KEYS",
    "SAMPLERS",
    "SECRET_KEYS",
    "SEED_REDACTED",
    "SOURCES",
    "STAGE_PLACEMENTS",
    "TUNE_MODES",
    "CentralConfig",
    "Config",
    "DataConfig",
    "DiffusionConfig",
    "EvalConfig",
    "FidConfig",
    "FinetuneConfig",
    "ModelConfig",
    "PrivacyConfig",
    "RunConfig",
    "SampleConfig",
    "TrackingConfig",
    "TuneConfig",
    "WarmupConfig",
    "from_dict",
    "from_public_dict",
    "is_uri",
    "load",
    "parse_override",
    "replace",
    "validate",
    "validate_against_n",
]
