"""Driving planners on the procedural benchmark of ``envs.driving`` (PDMS-like scorer).

tokenizer  uniform trajectory tokenizer (waypoints or error-fed deltas)
masked     masked discrete-diffusion token planner: loss, decoding orders, log-likelihood estimators
rl         GSPO / GRPO group RL with group-normalised PDMS-like rewards or decoupled sub-score advantages (GDPO)
selector   a learned trajectory scorer (Hydra-MDP style) choosing among proposals without the log
anchor     truncated anchor diffusion (DiffusionDrive style) and a vanilla 20-step diffusion planner
data       scene sets with expert plans; robomimic-layout demos
train      behaviour cloning and evaluation; plots: curves and scene pictures
"""

from dpolicy.drive.masked import ORDERS, MaskedTokenPlanner, masked_diffusion_loss
from dpolicy.drive.rl import RLConfig, decoupled_advantages, group_advantages, grpo_loss, gspo_loss, rl_train
from dpolicy.drive.tokenizer import TrajectoryTokenizer

__all__ = ["TrajectoryTokenizer", "MaskedTokenPlanner", "masked_diffusion_loss", "ORDERS", "RLConfig", "rl_train",
           "gspo_loss", "grpo_loss", "group_advantages", "decoupled_advantages"]
