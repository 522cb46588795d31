"""The released EMA model as an MLflow model: a pyfunc that samples images for given labels.

``mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"label": [0, 3, 3]}))`` returns uint8 images
[N, C, H, W], one per label, drawn with the run's sampler (``params``: ``steps``, ``guidance``,
``seed``; ``seed`` -1 = OS entropy). Sampling from released weights is post-processing: any number
of images costs no privacy.

What goes in is the release only (docs/privacy.md §1, §7): ``release/model/ema.pt``,
``release/model/meta.json``, ``release/config.json`` (the public config, noise seeds redacted) and
``release/release.json``; ``Tracker.log_release_model`` refuses any other file, in either mode. The
model's card (tags, description, the MLmodel ``metadata``) is taken from ``release.json``: epsilon,
delta, accountant, neighbouring relation, N, the config hash and ``seeded``. The model is logged with
the dpfeta package itself (``code_paths``), so loading it needs torch and numpy, not a dpfeta install.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in the run
ARTIFACTS = {"weights": "model/ema.pt", "meta": "model/meta.json", "config": "config.json",
             "release": "release.json"}  # relative to release/
PARAMS = {"steps": -1, "guidance": -1.0, "seed": -1}  # -1: the run's sample.* setting (seed: OS entropy)


class Sampler(mlflow.pyfunc.PythonModel):
    """pyfunc: labels (a DataFrame with a ``label`` column, or an int array) -> uint8 [N, C, H, W]."""

    def load_context(self, context) -> None:
        import torch

        from dpfeta import config as config_mod
        from dpfeta import sample

        # seeds redacted in the release (sampling seeds come with each call), paths and hosts too
        self.cfg = config_mod.from_public_dict(json.loads(Path(context.artifacts["config"]).read_text()))
        denoiser = sample.build_denoiser(self.cfg)
        state = torch.load(context.artifacts["weights"], map_location="cpu", weights_only=True)
        if all(key.startswith("net.") for key in state):  # saved as EDMPrecond, not its U-Net
            state = {key[len("net."):]: value for key, value in state.items()}
        denoiser.net.load_state_dict(state)
        self.denoiser = denoiser.eval()

    def predict(self, context, model_input, params: Optional[dict] = None):
        import numpy as np
        import torch

        from dpfeta import config as config_mod
        from dpfeta import rng, sample

        labels = labels_of(model_input, self.cfg.data.num_classes)
        params = {**PARAMS, **(params or {})}
        updates = {}
        if int(params["steps"]) > 0:
            updates["sample.steps"] = int(params["steps"])
        if float(params["guidance"]) >= 0:
            updates["sample.guidance"] = float(params["guidance"])
        cfg = config_mod.replace(self.cfg, updates) if updates else self.cfg
        seed = int(params["seed"])
        generator = rng.make_generator(seed if seed >= 0 else None, stream="sample")
        images, _ = sample.generate(self.denoiser, cfg, len(labels), generator=generator, progress=False,
                                    labels=torch.as_tensor(labels))
        return np.ascontiguousarray(images.numpy())


def labels_of(model_input: Any, num_classes: int):
    """Class ids from a DataFrame (``label`` column, or its only column), a Series, a list or an array."""
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        if "label" in model_input.columns:
            model_input = model_input["label"]
        elif model_input.shape[1] == 1:
            model_input = model_input.iloc[:, 0]
        else:
            raise ValueError(f"expected a 'label' column of class ids, got columns {list(model_input.columns)}")
    labels = np.asarray(model_input).reshape(-1)
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        if not np.all(np.equal(np.mod(labels.astype(float), 1), 0)):
            raise ValueError(f"expected integer class ids, got {labels[:5].tolist()} ({labels.dtype})")
        labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"expected class ids in 0..{num_classes - 1}, got {int(labels.min())}..{int(labels.max())}")
    return labels.astype(np.int64)


def signature(cfg):
    """labels in (a long ``label`` column), uint8 [-1, C, H, W] out; sampling params."""
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema, TensorSpec

    d = cfg.data
    return ModelSignature(
        inputs=Schema([ColSpec("long", "label")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, d.channels, d.resolution, d.resolution), "images")]),
        params=ParamSchema([ParamSpec("steps", "long", PARAMS["steps"]),
                            ParamSpec("guidance", "double", PARAMS["guidance"]),
                            ParamSpec("seed", "long", PARAMS["seed"])]))


def input_example(cfg):
    """One label of each of the first (up to) two classes."""
    import pandas as pd

    return pd.DataFrame({"label": list(range(min(2, cfg.data.num_classes)))}, dtype="int64")


def card(record: dict) -> tuple[dict[str, str], str]:
    """(tags, markdown description) of the model from ``release.json``."""
    tags = {"dp.epsilon": str(float(record["epsilon"])), "dp.delta": f"{record['delta']:g}",
            "dp.accountant": str(record["accountant"]), "dp.neighbouring_relation": record["neighbouring_relation"],
            "dp.n": str(record["n"]), "dp.config_sha256": record["config_sha256"],
            "dp.seeded": str(record["seeded"]).lower(), "dp.kind": record.get("kind", "run")}
    text = (f"Class-conditional diffusion model (EMA weights) trained with DP-FETA. The weights are "
            f"(epsilon = {record['epsilon']:.4f}, delta = {record['delta']:g})-differentially private with respect "
            f"to the sensitive training split (N = {record['n']}, {record['neighbouring_relation']}), accounted "
            f"with the {record['accountant']} accountant over every mechanism. Config sha256 "
            f"{record['config_sha256']}; seeded: {str(record['seeded']).lower()}.\n\n"
            "predict(DataFrame({'label': [...]})) returns one uint8 image [C, H, W] per label; params: steps, "
            "guidance, seed (-1: the run's settings, OS entropy). Sampling is post-processing and costs no privacy.")
    return tags, text


def pip_requirements() -> list[str]:
    """What loading the model needs (dpfeta itself travels as code)."""
    from importlib import metadata

    return [f"{dist}=={metadata.version(dist)}" for dist in ("torch", "numpy", "pyyaml", "pillow", "pandas")] + [
        f"mlflow=={metadata.version('mlflow')}"]


def package_dir() -> str:
    import dpfeta

    return str(Path(dpfeta.__file__).parent)
