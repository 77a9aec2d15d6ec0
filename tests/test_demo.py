"""`make demo` in miniature: the same demo/run.sh with a tiny world and a few steps; every output loads."""

import json
import os
import subprocess
import sys

import evaluate
import merge_policies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_demo_pipeline_in_miniature(tmp_path):
    env = dict(os.environ, PY=sys.executable, OUT=str(tmp_path / "demo"), WORLD=str(tmp_path / "world"),
               SIZE="tiny", STEPS="3", SAMPLES="2", QS="0.5 0.9")
    run = subprocess.run(["bash", os.path.join(ROOT, "demo", "run.sh")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = tmp_path / "demo"
    for folder in (out / "reward", out / "safety", out / "mix" / "q0.5", out / "mix" / "q0.9"):
        model = merge_policies.load_policy(str(folder))
        assert sum(p.numel() for p in model.parameters()) > 0
    results = json.load(open(out / "results.json"))
    assert [r["policy"] for r in results] == ["sft", "reward", "safety", "q0.5", "q0.9"]
    assert all(set(evaluate.RESULT_KEYS) <= set(r) for r in results)
    assert (out / "report.md").stat().st_size > 0 and (out / "frontier.png").stat().st_size > 0
    from demo import readme_table as readme

    rows = readme.report_table(str(out / "report.md")).splitlines()  # the table `make readme` pastes
    assert [r.split(" | ")[0] for r in rows[2:]] == ["| sft", "| reward", "| safety", "| q0.5", "| q0.9"]
    assert rows[2].endswith("| 0.500 |")  # the baseline's win rate against itself (ties count half)
    # a re-run reuses every finished step
    again = subprocess.run(["bash", os.path.join(ROOT, "demo", "run.sh")], env=env, capture_output=True, text=True,
                           timeout=600)
    assert again.returncode == 0
    assert again.stdout.count("already complete with this config") == 2 and "already built" in again.stdout


def test_readme_table_is_pasted_from_the_report_and_checked(tmp_path, capsys):
    from demo import readme_table as readme

    report = tmp_path / "report.md"
    report.write_text("# Evaluation report\n\n## Summary\n\n| policy | x |\n|---|---|\n| sft | 1.000 |\n\n## All\n\n"
                      "| other | table |\n")
    page = tmp_path / "README.md"
    page.write_text(f"intro\n{readme.BEGIN}\n| policy | x |\n|---|---|\n| sft | 0.999 |\n{readme.END}\nrest\n")
    argv = ["--report", str(report), "--readme", str(page)]
    assert readme.main([*argv, "--check"]) == 1 and "differs" in capsys.readouterr().err
    assert readme.main(argv) == 0
    text = page.read_text()
    assert "| sft | 1.000 |" in text and "0.999" not in text and "| other |" not in text
    assert text.startswith("intro\n") and text.endswith(f"{readme.END}\nrest\n") and "at commit" in text
    assert readme.main([*argv, "--check"]) == 0


def test_smoke_gpu_stops_with_one_line_without_cuda():
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: make smoke-gpu runs for real")
    run = subprocess.run([sys.executable, "-m", "bench.smoke_gpu", "--out", os.devnull], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and run.stderr.strip().splitlines() == [
        "python -m bench.smoke_gpu: error: needs a CUDA GPU and this machine has none (make demo runs the pipeline on "
        "the CPU)"]
