"""The released EMA model as an MLflow model: a pyfunc that samples images for given labels.

``mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"label": [0, 3, 3]}))`` returns uint8 images
[N, C, H, W], one per label, drawn with the run's sampler (``params``: ``steps``, ``guidance``,
``seed``; ``seed`` -1 = OS entropy). Sampling from released weights is post-processing: any number
of images costs no privacy.

What goes in is the release only (docs/privacy.md §1, §7): ``release/model/ema.pt``,
``release/model/meta.json``, ``release/config.json`` (the public config, noise seeds redacted) and
``release/release.json``; ``log_release_model`` refuses any other file, in either mode. The
model's card (tags, description, the MLmodel ``metadata``) is taken from ``release.json``: epsilon,
delta, accountant, neighbouring relation, N, the config hash and ``seeded``. The model is logged with
the dpfeta package itself (``code_paths``), so loading it needs torch and numpy, not a dpfeta install.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import mlflow.pyfunc

from dpfeta import config as config_mod
from dpfeta import release as release_mod

log = logging.getLogger(__name__)

ENV_URI = "MLFLOW_TRACKING_URI"
MODEL_NAME = "model"  # the logged model's name in the run
ARTIFACTS = {
    "weights": "model/ema.pt",
    "meta": "model/meta.json",
    "config": "config.json",
    "release": "release.json",
}  # relative to release/
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
            state = {key[len("net.") :]: value for key, value in state.items()}
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
        images, _ = sample.generate(
            self.denoiser, cfg, len(labels), generator=generator, progress=False, labels=torch.as_tensor(labels)
        )
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
        params=ParamSchema(
            [
                ParamSpec("steps", "long", PARAMS["steps"]),
                ParamSpec("guidance", "double", PARAMS["guidance"]),
                ParamSpec("seed", "long", PARAMS["seed"]),
            ]
        ),
    )


def input_example(cfg):
    """One label of each of the first (up to) two classes."""
    import pandas as pd

    return pd.DataFrame({"label": list(range(min(2, cfg.data.num_classes)))}, dtype="int64")


def card(record: dict) -> tuple[dict[str, str], str]:
    """(tags, markdown description) of the model from ``release.json``."""
    tags = {
        "dp.epsilon": str(float(record["epsilon"])),
        "dp.delta": f"{record['delta']:g}",
        "dp.accountant": str(record["accountant"]),
        "dp.neighbouring_relation": record["neighbouring_relation"],
        "dp.n": str(record["n"]),
        "dp.config_sha256": record["config_sha256"],
        "dp.seeded": str(record["seeded"]).lower(),
        "dp.kind": record.get("kind", "run"),
    }
    text = (
        f"Class-conditional diffusion model (EMA weights) trained with DP-FETA. The weights are "
        f"(epsilon = {record['epsilon']:.4f}, delta = {record['delta']:g})-differentially private with respect "
        f"to the sensitive training split (N = {record['n']}, {record['neighbouring_relation']}), accounted "
        f"with the {record['accountant']} accountant over every mechanism. Config sha256 "
        f"{record['config_sha256']}; seeded: {str(record['seeded']).lower()}.\n\n"
        "predict(DataFrame({'label': [...]})) returns one uint8 image [C, H, W] per label; params: steps, "
        "guidance, seed (-1: the run's settings, OS entropy). Sampling is post-processing and costs no privacy."
    )
    return tags, text


def pip_requirements() -> list[str]:
    """What loading the model needs (dpfeta itself travels as code)."""
    from importlib import metadata

    return [f"{dist}=={metadata.version(dist)}" for dist in ("torch", "numpy", "pyyaml", "pillow", "pandas")] + [
        f"mlflow=={metadata.version('mlflow')}"
    ]


def package_dir() -> str:
    import dpfeta

    return str(Path(dpfeta.__file__).parent)


def log_release_model(tracker, register_as: Optional[str] = None) -> Optional[str]:
    """The released EMA weights of ``tracker``'s run (a ``tracking.Tracker``, or None: nothing) as an
    MLflow pyfunc model, with its card from release/release.json; registered as ``register_as`` if given.
    Only files of release/ go in, whatever the mode (anything else is refused). Returns the model URI,
    or None on failure (best effort, like every tracking call)."""
    if tracker is None:
        return None
    if tracker.release_root is None:
        raise ValueError("expected a run with a release/ folder to log its model, got none")
    root = Path(tracker.release_root)
    files = {key: root / rel for key, rel in ARTIFACTS.items()}
    for path in files.values():
        where = tracker.artifact_path_for(path) if path.is_file() else None
        if where is None or where.split("/")[0] != release_mod.RELEASE_DIR:
            raise ValueError(f"expected the model's files in '{root}' (release/), got '{path}'")
    record = json.loads(files["release"].read_text())
    cfg = config_mod.from_public_dict(json.loads(files["config"].read_text()))
    tags, description = card(record)
    logged: list = []

    def run():
        with _global_tracking_uri(tracker.uri):
            with mlflow.start_run(run_id=tracker.run_id):
                info = mlflow.pyfunc.log_model(
                    name=MODEL_NAME,
                    python_model=Sampler(),
                    artifacts={k: str(v) for k, v in files.items()},
                    code_paths=[package_dir()],
                    signature=signature(cfg),
                    input_example=input_example(cfg),
                    pip_requirements=pip_requirements(),
                    metadata={"dpfeta": record},
                    tags={**tags, "mlflow.note.content": description},
                    registered_model_name=register_as,
                )
                mlflow.set_tag("dpfeta.model_uri", info.model_uri)
        if register_as and info.registered_model_version is not None:
            version = str(info.registered_model_version)
            tracker.client.update_model_version(register_as, version, description=description)
            for key, value in tags.items():
                tracker.client.set_model_version_tag(register_as, version, key, value)
        logged.append(info.model_uri)

    tracker._call("log_release_model", run)
    return logged[0] if logged else None


@contextlib.contextmanager
def _global_tracking_uri(uri: str):
    """MLflow's fluent API (``log_model``) for one block, then the process exactly as it was: MLflow's
    ``set_tracking_uri`` also exports MLFLOW_TRACKING_URI, which would redirect every later run of this
    process (a sweep after a run, the next test) to this run's store."""
    import mlflow
    from mlflow.tracking._tracking_service import utils as uri_state

    before_global, before_env = uri_state._tracking_uri, os.environ.get(ENV_URI)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before_global)  # None: MLflow unsets the variable
        if before_env is None:
            os.environ.pop(ENV_URI, None)
        else:
            os.environ[ENV_URI] = before_env
