"""Data-parallel training with torchrun: 2 CPU processes on the gloo backend stay in lock step."""

import json
import subprocess
import sys
import textwrap


SCRIPT = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from dpolicy.train import distributed as d
    rank, ws, _ = d.init_from_env("cpu")
    from test_trainer import make_trainer
    tr = make_trainer({out!r}, steps=30, ckpt_every=30)
    assert tr.world_size == 2
    hist = tr.fit()
    flat = torch.cat([p.detach().flatten() for p in tr.policy.parameters()])
    json.dump({{"rank": rank, "checksum": float(flat.double().sum()), "first": flat[:5].tolist(),
               "loss": hist[-1]["loss"], "perm": tr.data.perm[:5].tolist()}}, open({out!r} + f"/rank{{rank}}.json", "w"))
    d.cleanup()
""")


def test_two_process_gloo_ddp_keeps_replicas_identical(tmp_path):
    from pathlib import Path

    out = tmp_path / "run"
    out.mkdir()
    script = tmp_path / "ddp.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent), out=str(out)))
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517",
                          str(script)], capture_output=True, text=True, timeout=170)
    assert res.returncode == 0, res.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{i}.json").read_text()) for i in (0, 1))
    assert r0["checksum"] == r1["checksum"] and r0["first"] == r1["first"]  # gradients were all-reduced
    assert r0["perm"] != r1["perm"]  # each rank read its own shard of the data
    assert (out / "checkpoints" / "latest").exists()  # only rank 0 writes, and it did
