"""Procedural driving scenes, a batched PDMS-like scorer and a PDM-Closed-style expert (torch, batched).

This package never imports dpolicy; the planners and RL that use it live in dpolicy/drive.
"""

from dpolicy_envs.driving.expert import candidates, expert_plan, forecast, observe
from dpolicy_envs.driving.scenes import Scenes, boundary_polygon, generate_scenes, road_points, split_seeds
from dpolicy_envs.driving.scorer import SUB_SCORES, score, track
from dpolicy_envs.driving.vector import observe_vector

__all__ = ["Scenes", "generate_scenes", "split_seeds", "boundary_polygon", "road_points", "score", "track",
           "SUB_SCORES", "candidates", "expert_plan", "forecast", "observe", "observe_vector"]
