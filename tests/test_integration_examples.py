"""Every example in examples/ runs as written (a process each) and prints its summary.

The processes are forked from one launcher that has imported what the examples import
(``tests/run_examples.py``): each example's file runs as ``__main__`` from a fresh
state, without paying torch's, transformers' and TRL's imports again.
"""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = ("anchor/penalty", "anchor/off_anchor_mean", "anchor/off_anchor_max")
EXAMPLES = ["trainer_lora", "trl_sft", "accelerate_loop", "plain_loop"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, tuple[int, str, str]]:
    """``{example: (exit status, stdout, stderr)}`` of every example."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "TRANSFORMERS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    out = tmp_path_factory.mktemp("examples")
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "run_examples.py"), str(out), *EXAMPLES],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=480)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    return {n: (status[n], (out / f"{n}.out").read_text(), (out / f"{n}.err").read_text()) for n in EXAMPLES}


@pytest.mark.slow
@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_as_written(runs, name):
    code, stdout, stderr = runs[name]
    assert code == 0, (stdout + stderr)[-4000:]
    last = stdout.strip().splitlines()[-1]
    summary = ast.literal_eval(last)
    assert set(summary) == set(KEYS)
    assert summary["anchor/penalty"] > 0
