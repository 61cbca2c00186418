"""Deployment: the controller runtime (chunked and RTI warm-started execution), its fast path and
export, a fixed-rate control-loop harness, and batched success evaluation of controllers.

``Controller(policy, mode="rti", k=3)`` with ``reset()`` / ``step(obs) -> action``;
``run_loop(controller, env, rate_hz)`` for latency and deadline misses; ``evaluate_controller`` for
success rates over seeded episodes; ``export_step`` / ``load_step`` for a dpolicy-free deployment.
``FastStep`` is the controller's hot path: the ``DecisionStep`` specialized to a batch size, bit-for-bit equal.
"""

from dpolicy.deploy.controller import MODES, Controller
from dpolicy.deploy.evaluate import evaluate_controller
from dpolicy.deploy.export import export_step, load_step
from dpolicy.deploy.loop import LoopReport, control_rate, run_loop
from dpolicy.deploy.kernel import DecisionStep, DiscreteActions, FastStep, fast_field, has_fast_form, shift_chunk
from dpolicy.deploy.schedule import REMEDIES, DiscreteDim, parse_discrete, resolve_timesteps, warm_schedule

__all__ = ["MODES", "REMEDIES", "Controller", "DecisionStep", "DiscreteActions", "DiscreteDim", "FastStep", "LoopReport",
           "control_rate", "evaluate_controller", "export_step", "fast_field", "has_fast_form", "load_step", "parse_discrete",
           "resolve_timesteps", "run_loop", "shift_chunk", "warm_schedule"]
