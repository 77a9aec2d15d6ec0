"""`make demo` in miniature: the same demo.sh with a tiny world and a few steps; every output loads."""

import json
import os
import subprocess
import sys

import evaluate
import stage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline_in_miniature(tmp_path):
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "demo"), WORLD=str(tmp_path / "world"),
               SIZE="tiny", STEPS="3", SAMPLES="2", QS="0.5 0.9")
    run = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "demo"
    for folder in (out / "reward", out / "safety", out / "mix" / "q0.5", out / "mix" / "q0.9"):
        model = stage.load_policy(str(folder))
        assert sum(p.numel() for p in model.parameters()) > 0
    results = json.load(open(out / "results.json"))
    assert [r["policy"] for r in results] == ["sft", "reward", "safety", "q0.5", "q0.9"]
    assert all(set(evaluate.RESULT_KEYS) <= set(r) for r in results)
    assert (out / "report.md").stat().st_size > 0 and (out / "frontier.png").stat().st_size > 0
    # a re-run reuses every finished step
    again = subprocess.run(["bash", os.path.join(ROOT, "demo.sh")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("already complete with this config") == 2 and "already built" in again.stdout
