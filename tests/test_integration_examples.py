"""Every example in examples/ runs as written (a subprocess each) and prints its summary."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("anchor/penalty", "anchor/off_anchor_mean", "anchor/off_anchor_max")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["trainer_lora", "trl_sft", "accelerate_loop", "plain_loop"])
def test_example_runs_as_written(name):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / f"{name}.py")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    last = proc.stdout.strip().splitlines()[-1]
    summary = ast.literal_eval(last)
    assert set(summary) == set(KEYS)
    assert summary["anchor/penalty"] > 0
