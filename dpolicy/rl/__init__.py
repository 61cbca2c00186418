"""Latent-noise steering (DSRL): reinforcement learning in the noise space of a frozen policy.

The base policy's weights never change. An RL actor picks the initial noise ``w`` of the
denoising, the frozen policy maps ``(observation, w)`` to an action chunk, the environment
executes the chunk's first ``Ta`` actions. ``NoiseActionEnv`` is that MDP; ``DSRLAgent`` learns it
with SAC over the noise (``algo="sac"``) or with noise aliasing (``algo="na"``: an action-space
critic trained on executed chunks, distilled into a noise-space critic the actor maximizes);
``SteeredPolicy`` is the result, a policy like any other; ``steer`` is the training loop behind
``dpolicy-steer``.
"""

from dpolicy.rl.agent import DSRLAgent, DSRLConfig
from dpolicy.rl.noise_env import NoiseActionEnv
from dpolicy.rl.replay import ReplayBuffer
from dpolicy.rl.steered import SteeredPolicy

__all__ = ["DSRLAgent", "DSRLConfig", "NoiseActionEnv", "ReplayBuffer", "SteeredPolicy"]
