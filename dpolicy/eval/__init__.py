"""Evaluation of chunk policies: batched seeded rollouts, success statistics, videos and plots.

``evaluate(policy, env_fn, ...)`` returns an ``EvalResult``; ``EpisodeRunner`` is the episode loop under
it (and under the controller's evaluation and the noise-action env); ``wilson_interval`` and
``total_variation`` are the statistics it and the benchmarks use; ``record_video`` /
``write_video`` make videos; ``plot_learning_curve`` / ``plot_success_vs`` make headless PNGs.
The video and plot modules are imported on first use so that ``import dpolicy.eval`` does not
pay for matplotlib or imageio when only numbers are wanted.
"""

from dpolicy.eval.rollout import EvalResult, evaluate, make_vector_env, summarize
from dpolicy.eval.runner import EpisodeRecord, EpisodeRunner, run_episodes
from dpolicy.eval.stats import mode_frequencies, total_variation, wilson_interval

_LAZY = {
    "RenderError": "dpolicy.eval.video",
    "record_video": "dpolicy.eval.video",
    "write_video": "dpolicy.eval.video",
    "plot_learning_curve": "dpolicy.eval.plots",
    "plot_success_vs": "dpolicy.eval.plots",
}

__all__ = [
    "EpisodeRecord", "EpisodeRunner", "EvalResult", "RenderError", "evaluate", "make_vector_env", "mode_frequencies",
    "plot_learning_curve", "plot_success_vs", "record_video", "run_episodes", "summarize",
    "total_variation", "wilson_interval", "write_video",
]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dpolicy.eval' has no attribute {name!r}")
