"""Ray Tune sweeps under a fixed total privacy budget (docs/privacy.md, "Tuning").

Three tuning privacy modes (``tune.privacy_mode``): ``private`` (random search over a random number
of trials, the selected trial released; repeat-and-select), ``naive`` (k trials composed) and
``public`` (trials on a public proxy, the final run pays). The accounting is ``privacy.sweep``; this
package is the machinery: ``space`` (search space), ``spec`` (what a trial is given, its opaque id),
``trial`` (one trial in its run folder), ``score`` (its DP score), ``sweep`` (decisions stored once, the
Tuner, resume), ``summary`` (release/, operator files, MLflow). What a sweep publishes is ``<sweep dir>/release/`` only.
"""

from dpfeta.tune.space import check_search_space, search_space
from dpfeta.tune.spec import TrialContext, TrialSpec, opaque_id
from dpfeta.tune.summary import SUMMARY_FILE, SWEEP_FILE, TRIALS_FILE
from dpfeta.tune.sweep import EXPERIMENT, plan_sweep, run_sweep
from dpfeta.tune.trial import RESULT_FILE

__all__ = [
    "EXPERIMENT",
    "RESULT_FILE",
    "SUMMARY_FILE",
    "SWEEP_FILE",
    "TRIALS_FILE",
    "TrialContext",
    "TrialSpec",
    "check_search_space",
    "opaque_id",
    "plan_sweep",
    "run_sweep",
    "search_space",
]
