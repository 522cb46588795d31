"""Checkpoints as plain state_dicts (no wrapper prefixes, no pickled modules) plus ``meta.json``.

Layout of a checkpoint directory::

    model.pt       raw (non-EMA) weights        ema.pt     EMA weights
    optimizer.pt   optimiser state (optional)   extra.pt   other tensors, e.g. RNG state (optional)
    meta.json      config, step and anything else JSON-serialisable

``save`` writes into a temporary sibling and swaps it in, so an interrupted save leaves the
previous checkpoint readable. ``load`` uses ``torch.load(weights_only=True)`` only. ``find`` takes a
stage folder or its checkpoint; ``check_model`` refuses a checkpoint of another network than the config's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

WRAPPER_PREFIXES = ("_module.", "module.")


def strip_prefixes(state_dict: dict[str, Any]) -> dict[str, Any]:
    """Remove leading wrapper prefixes (Opacus ``_module.``, DDP/DPDDP ``module.``), repeatedly."""
    out = {}
    for key, value in state_dict.items():
        stripped = True
        while stripped:
            stripped = False
            for prefix in WRAPPER_PREFIXES:
                if key.startswith(prefix):
                    key, stripped = key[len(prefix) :], True
        out[key] = value
    return out


def _state(obj: nn.Module | dict) -> dict:
    return strip_prefixes(obj if isinstance(obj, dict) else obj.state_dict())


def save(
    directory: Path | str,
    *,
    model: nn.Module | dict,
    ema: nn.Module | dict | None = None,
    optimizer: torch.optim.Optimizer | dict | None = None,
    meta: dict,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically (re)write the checkpoint directory; returns its path."""
    directory = Path(directory)
    tmp, old = directory.with_name(directory.name + ".tmp"), directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    torch.save(_state(model), tmp / "model.pt")
    if ema is not None:
        torch.save(_state(ema), tmp / "ema.pt")
    if optimizer is not None:
        torch.save(optimizer if isinstance(optimizer, dict) else optimizer.state_dict(), tmp / "optimizer.pt")
    if extra is not None:
        torch.save(extra, tmp / "extra.pt")
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
    # Swap in: the previous checkpoint stays readable as <name>.old until the new one is in place.
    shutil.rmtree(old, ignore_errors=True)
    if directory.exists():
        directory.rename(old)
    tmp.rename(directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def exists(directory: Path | str) -> bool:
    directory = Path(directory)
    return any((d / "meta.json").is_file() for d in (directory, directory.with_name(directory.name + ".old")))


def find(directory: Path | str) -> Path:
    """The checkpoint of a stage folder: ``directory`` itself or ``directory/checkpoint``."""
    directory = Path(directory)
    for candidate in (directory, directory / "checkpoint"):
        if exists(candidate):
            return candidate
    raise ValueError(f"expected a checkpoint (meta.json) in '{directory}' or '{directory / 'checkpoint'}', found none")


def check_model(meta: dict, cfg: Any, where: Path | str, *, doing: str = "load") -> None:
    """Refuse (``cannot <doing> ...``) a checkpoint whose ``meta`` records another ``model`` section than
    the dpfeta config ``cfg`` asks for; a meta without a config passes."""
    saved, wanted = meta.get("config", {}).get("model"), cfg.to_dict()["model"]
    if saved is not None and saved != wanted:
        raise ValueError(
            f"cannot {doing} checkpoint '{where}': it holds model={saved}, but the config asks for model={wanted}"
        )


def load(directory: Path | str, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """-> {"model", "ema", "optimizer", "extra", "meta"} (missing optional parts are None)."""
    directory = Path(directory)
    if not (directory / "meta.json").is_file():
        old = directory.with_name(directory.name + ".old")  # a save was interrupted mid-swap
        if not (old / "meta.json").is_file():
            raise ValueError(f"expected a checkpoint directory with meta.json at '{directory}'")
        directory = old

    def part(name: str) -> Any:
        path = directory / name
        return torch.load(path, map_location=map_location, weights_only=True) if path.is_file() else None

    return {
        "model": part("model.pt"),
        "ema": part("ema.pt"),
        "optimizer": part("optimizer.pt"),
        "extra": part("extra.pt"),
        "meta": json.loads((directory / "meta.json").read_text()),
    }
