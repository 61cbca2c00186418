"""The learned trajectory scorer: shapes, its checkpoint, learning a rating it is shown, selection without the log."""

import pytest
import torch

from dpolicy.drive.data import build_set
from dpolicy.drive.selector import (TrajectoryScorer, combine, proposals, rated_candidates, scoring_set, select,
                                    train_scorer)


@pytest.fixture(scope="module")
def scenes():
    return build_set("train", 16, encoder="vector_mlp")


class _Straight:
    """A stand-in proposer: constant speed ahead, with a per-sample speed jitter."""

    def plan(self, obs, gen=None, steps=None):
        B = obs["map"].shape[0]
        v = 5 + 10 * torch.rand(B, 1, 1, generator=gen)
        t = torch.arange(1, 9).float()[None, :, None] * 0.5
        return torch.cat([v * t, torch.zeros(B, 8, 1)], -1)


def test_scoring_set_labels_are_the_scorer_sub_scores(scenes):
    from dpolicy_envs.driving import SUB_SCORES, candidates, score

    trajs, labels = scoring_set(_Straight(), scenes, samples=3, chunk=5)
    assert trajs.shape == (16, 3 + candidates(scenes.scenes).shape[1], 8, 2) and labels.shape == trajs.shape[:2] + (5,)
    r = score(scenes.scenes, trajs, best_progress=scenes.best_progress)
    assert torch.equal(labels, torch.stack([r[k] for k in SUB_SCORES], -1))
    assert torch.allclose(combine({k: labels[..., i] for i, k in enumerate(SUB_SCORES)}), r["pdms"])


def test_scorer_learns_to_rank_and_round_trips(tmp_path, scenes):
    from dpolicy.kinds import load_policy

    trajs, labels = scoring_set(_Straight(), scenes, samples=2)
    sc = TrajectoryScorer(d=32, layers=1, heads=2, encoder_layers=1)
    before = sc.loss(scenes.obs, trajs, labels).item()
    train_scorer(sc, scenes, trajs, labels, steps=150, batch=16, per_scene=8, lr=3e-3)
    after = sc.loss(scenes.obs, trajs, labels).item()
    assert after < 0.7 * before, (before, after)
    out = sc(scenes.obs, trajs)
    assert set(out) >= {"nc", "dac", "ttc", "comfort", "ep", "pdms"} and out["pdms"].shape == trajs.shape[:2]
    sc.save(tmp_path / "scorer")
    back = load_policy(str(tmp_path / "scorer"))
    assert type(back) is TrajectoryScorer and torch.allclose(back(scenes.obs, trajs)["pdms"], out["pdms"])


def test_candidates_do_not_attend_to_each_other_and_selection_reads_no_log(scenes):
    from dataclasses import replace

    sc = TrajectoryScorer(d=32, layers=1, heads=2, encoder_layers=1).eval()
    trajs = proposals(_Straight(), scenes.obs, scenes.scenes, 4, torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = sc(scenes.obs, trajs)["pdms"]
        part = sc(scenes.obs, trajs[:, :3])["pdms"]
    assert torch.allclose(full[:, :3], part, atol=1e-6)
    pick = select(sc, _Straight(), scenes, samples=4)
    s = scenes.scenes
    blind = replace(scenes, scenes=replace(s, agents=torch.cat([s.agents[:, :, :1], 0 * s.agents[:, :, 1:]], 2)))
    assert torch.equal(select(sc, _Straight(), blind, samples=4), pick)
    from dpolicy_envs.driving import candidates

    rule = select(sc, None, scenes, samples=0, rule=True)  # no planner: the rule candidates alone
    assert ((candidates(scenes.scenes) - rule[:, None]).abs().amax((-1, -2)) == 0).any(1).all()
    with pytest.raises(Exception, match="proposals"):
        select(sc, None, scenes, samples=0, rule=False)
    with pytest.raises(Exception, match="shape"):
        sc(scenes.obs, trajs[..., 0])


def test_rated_candidates_hold_the_teachers_choice_and_soft_targets_follow_their_weights(scenes):
    from dpolicy.drive.train import _target_draw

    torch.manual_seed(0)
    sc = TrajectoryScorer(d=16, layers=1, heads=2, encoder_layers=1).eval()
    cand, ratings = rated_candidates(sc, scenes, chunk=5)
    assert cand.shape[:2] == ratings.shape and ratings.shape[0] == scenes.n
    best = cand[torch.arange(scenes.n), ratings.argmax(1)]
    assert torch.equal(best, select(sc, None, scenes, 0, rule=True))  # the hard target is the scorer's choice
    # one-hot weights give that choice back; two equal weights are drawn about equally often, others never
    draw = _target_draw(cand, torch.nn.functional.one_hot(ratings.argmax(1), cand.shape[1]).float())
    gen = torch.Generator().manual_seed(0)
    idx = torch.arange(scenes.n)
    assert torch.equal(draw(idx, gen), best)
    w = torch.zeros_like(ratings)
    w[:, 2] = w[:, 5] = 0.5
    draw = _target_draw(cand, w)
    picks = torch.stack([draw(torch.zeros(1, dtype=torch.long), gen)[0] for _ in range(400)])
    hit2 = (picks == cand[0, 2]).flatten(1).all(1).float().mean()
    hit5 = (picks == cand[0, 5]).flatten(1).all(1).float().mean()
    assert hit2 + hit5 == 1 and 0.4 < hit2 < 0.6
    with pytest.raises(Exception, match="do not match"):
        _target_draw(cand, w[:, :3])
