"""The process contract and the one sampling loop every sampler in dpolicy goes through.

Time runs from 1 (pure noise) to 0 (data) for every process; a schedule is a list of
``(t, t_next)`` pairs with ``t > t_next``. A *field function* ``field_fn(x_t, t) -> field`` hides
the network and the conditioning, so the loop never needs to know about observations, and
several policies' fields can be mixed before a step.

Everything a sampler, a warm start, a composition or a compiled fast path needs is public here:

* the corruption ``x_t = alpha(t) * x0 + sigma(t) * eps`` (``coefficients``, ``noise_to``) and the
  scale of the initial noise (``noise_scale``: the sample at ``t = 1`` is ``noise_scale * noise``);
* the conversions between the network's field and the pair ``(x0_hat, eps_hat)`` (``split``,
  ``join``), and how the network sees ``x_t`` and ``t`` (``net_input_scale``, ``net_time``);
* the time with a given signal-to-noise ratio (``time_for``), the number of discrete levels
  (``levels``; ``None`` for continuous time) and the time of a level (``level_time``);
* the step as *coefficients + maths*: ``step_plan(t, t_next)`` returns the times the step evaluates
  the field at and the floats it needs, ``apply_step(plan, field, x, draw)`` does the arithmetic.
  ``step`` is exactly ``apply_step(step_plan(...))``, and a fast path that precomputes the plans
  runs the same arithmetic, so the two agree bit for bit;
* ``with_sampler`` (a copy with another sampler), ``evals`` (network evaluations of a schedule).

A new process is one module in this package that subclasses ``Process`` and registers itself with
``@register("name")``; ``build_process`` finds it by the config's ``type``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar, Sequence

import torch

from dpolicy.errors import ConfigError

FieldFn = Callable[[torch.Tensor, float], torch.Tensor]
# field(j, x): the network field at x and the j-th time of a step plan
IndexedField = Callable[[int, torch.Tensor], torch.Tensor]

REGISTRY: dict[str, type["Process"]] = {}


def register(name: str):
    """Class decorator: make a ``Process`` subclass buildable as ``process.type=name``."""
    def deco(cls):
        if name in REGISTRY and REGISTRY[name] is not cls:
            raise ConfigError(f"process type {name!r} is registered twice ({REGISTRY[name].__name__}, {cls.__name__}).")
        cls.name = name
        REGISTRY[name] = cls
        return cls
    return deco


@dataclass(frozen=True)
class StepPlan:
    """What one step from ``t`` to ``t_next`` needs, computed once: the times at which it evaluates the
    field (in order), its coefficients (floats, the process's own meaning) and whether it draws noise."""

    t: float
    t_next: float
    times: tuple
    coef: tuple
    noisy: bool = False


class Process:
    """Base class. Subclasses define the corruption, the training target and the step."""

    name: ClassVar[str] = "process"
    samplers: ClassVar[tuple] = ()
    stochastic: bool = False  # True when a step draws fresh noise (e.g. DDPM): sampling is not a function of the noise alone
    denoising: ClassVar[bool] = True  # False: no schedule to enter (warm starts) and no field to compose
    noise_scale: float = 1.0  # the sample at t = 1 is noise_scale * noise
    Options: ClassVar[type | None] = None  # dataclass of process-specific settings (``process.options``)

    # -- construction ---------------------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg) -> "Process":
        """Build from a ProcessConfig (its common fields and ``options``)."""
        raise NotImplementedError

    @classmethod
    def parse_options(cls, options) -> object | None:
        """Validate ``process.options`` against ``cls.Options``; unknown keys and bad types are named."""
        options = dict(options or {})
        if cls.Options is None:
            if options:
                raise ConfigError(f"process.options {sorted(options)} are unknown: process.type={cls.name!r} takes none.")
            return None
        fields = {f.name: f for f in dataclasses.fields(cls.Options)}
        unknown = sorted(set(options) - set(fields))
        if unknown:
            raise ConfigError(f"process.options {unknown} are unknown for process.type={cls.name!r}; "
                              f"valid options are {sorted(fields)}.")
        kwargs = {}
        for k, v in options.items():
            default = fields[k].default
            if isinstance(default, float) and not isinstance(v, bool) and isinstance(v, (int, float)):
                v = float(v)
            elif type(v) is not type(default):
                raise ConfigError(f"process.options.{k}={v!r} must be a {type(default).__name__}.")
            kwargs[k] = v
        return cls.Options(**kwargs)

    def with_sampler(self, sampler: str, **settings) -> "Process":
        """A copy of this process (same training, same field) that samples with ``sampler``."""
        raise ConfigError(f"sampler={sampler!r}: a {self.name} process has no samplers to choose from.")

    # -- the corruption and the field ----------------------------------------------------------------
    def coefficients(self, t: float) -> tuple[float, float]:
        """``(alpha, sigma)`` with ``x_t = alpha * x0 + sigma * eps`` at process time ``t``."""
        raise ConfigError(f"a {self.name} process has no noise schedule.")

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, t: float) -> torch.Tensor:
        """Corrupt clean chunks to time ``t`` (used by warm starts)."""
        a, s = self.coefficients(t)
        return a * x0 + s * noise

    def from_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The sample at ``t = 1`` for standard-normal ``noise``: ``noise_scale * noise`` (``noise`` itself when 1)."""
        return noise if self.noise_scale == 1.0 else noise * self.noise_scale

    def split(self, f: torch.Tensor, x: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The network's field at ``(x, t)`` -> ``(x0_hat, eps_hat)`` consistent with ``x``."""
        raise ConfigError(f"a {self.name} process has no field to split.")

    def join(self, x0: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """``(x0, eps)`` at time ``t`` -> the field the network of this process predicts."""
        raise ConfigError(f"a {self.name} process has no field to join.")

    def net_time(self, t: torch.Tensor) -> torch.Tensor:
        """Map process time in [0, 1] to the network's time input (a ~[0, 100] scale for every process)."""
        return t * 100.0

    def net_input_scale(self, t: float) -> float:
        """The network sees ``net_input_scale(t) * x_t`` (EDM's ``c_in``; 1 for most processes)."""
        return 1.0

    def time_for(self, alpha: float, sigma: float) -> float | None:
        """The time at which this process has the signal-to-noise ratio ``alpha / sigma``; ``None`` when its
        schedule has no such time (discrete levels that do not match)."""
        return None

    def field_signature(self) -> tuple:
        """Two processes with equal signatures read the same field at the same ``(x, t)``."""
        return (self.name,)

    # -- the schedule ---------------------------------------------------------------------------------
    @property
    def levels(self) -> int | None:
        """Number of discrete noise levels (a warm start's timestep list indexes them); None: continuous."""
        return None

    def level_time(self, level: int, levels: int = 100) -> float:
        """Process time of timestep ``level`` of ``self.levels`` levels (or of a ``levels`` grid in
        continuous time): ``(level + 1) / n``, so level 0 is the last noisy step before clean data."""
        n = self.levels or int(levels)
        return (level + 1) / n

    def schedule(self, steps: int, t_start: float = 1.0) -> list[tuple[float, float]]:
        """``steps`` (t, t_next) pairs from ``t_start`` down to 0."""
        raise NotImplementedError

    # -- the step -------------------------------------------------------------------------------------
    def step_plan(self, t: float, t_next: float) -> StepPlan:
        raise NotImplementedError

    def apply_step(self, plan: StepPlan, field: IndexedField, x: torch.Tensor,
                   draw: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """One step's arithmetic. ``field(j, x)`` is the network field at ``plan.times[j]``; ``draw()`` the
        step's fresh standard-normal noise (called only when ``plan.noisy``). Never modifies ``x``."""
        raise NotImplementedError

    def step(self, field_fn: FieldFn, x: torch.Tensor, t: float, t_next: float,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """One step from time ``t`` to ``t_next``; may call ``field_fn`` more than once (Heun)."""
        plan = self.step_plan(t, t_next)
        draw = lambda: torch.randn(x.shape, device=x.device, dtype=x.dtype, generator=generator)  # noqa: E731
        return self.apply_step(plan, lambda j, y: field_fn(y, plan.times[j]), x, draw)

    def evals(self, schedule: Sequence[tuple[float, float]]) -> int:
        """Network evaluations to integrate ``schedule``."""
        return sum(len(self.step_plan(t, tn).times) for t, tn in schedule)

    def loss(self, field_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
             generator: torch.Generator | None = None) -> torch.Tensor:
        """Per-sample training loss (B,) for clean chunks ``x0`` (B, Tp, Da)."""
        raise NotImplementedError


def uniform_schedule(steps: int, t_start: float = 1.0) -> list[tuple[float, float]]:
    """``steps`` equal steps of continuous time from ``t_start`` to 0."""
    if steps < 1:
        raise ConfigError(f"sampling steps={steps} must be at least 1.")
    ts = [t_start * (1 - i / steps) for i in range(steps + 1)]
    return list(zip(ts[:-1], ts[1:]))


def sample_loop(process: Process, field_fn: FieldFn, x: torch.Tensor, schedule: Sequence[tuple[float, float]],
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Integrate ``x`` along ``schedule``. Deterministic given ``x`` unless ``process.stochastic``."""
    for t, t_next in schedule:
        x = process.step(field_fn, x, t, t_next, generator)
    return x
