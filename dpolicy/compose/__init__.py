"""Test-time policy composition (GPC, Cao et al., "Compose Your Policies!").

``ComposedPolicy(parents, weights, operator)`` samples one shared noisy chunk with the parents'
fields mixed at every step (``convex``: ``sum_i w_i field_i`` on the simplex; ``product``: weighted
score sum, "AND"; ``mixture``: one parent per sample, "OR"); diffusion and flow parents compose
through a common ``(x0, eps)`` parameterization on a shared time grid (``fields``). The weights are
chosen by ``grid_search`` / ``cem_search`` on selection seeds and reported on disjoint seeds by
``select_and_report``. A composition saves as a directory that references its parents and loads
through ``dpolicy.policy.load_policy``.
"""

from dpolicy.compose.composed import ComposedPolicy, check_compatible
from dpolicy.compose.fields import OPERATORS, combine, matched_time
from dpolicy.compose.search import (Candidate, SearchResult, cem_search, grid_search, paired_difference,
                                    select_and_report, simplex_grid)

__all__ = ["ComposedPolicy", "check_compatible", "OPERATORS", "combine", "matched_time",
           "Candidate", "SearchResult", "cem_search", "grid_search", "paired_difference", "select_and_report",
           "simplex_grid"]
