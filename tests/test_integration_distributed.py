"""DDP and FSDP2 routes: two gloo CPU processes under torchrun (scripts in tests/dist/)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def torchrun(script: str, tag: str, *args: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist" / script), *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(tag + " ")), None)
    assert line is not None, out[-4000:]
    return json.loads(line[len(tag) + 1:])


def test_ddp_ranks_identical_and_equal_single_process():
    res = torchrun("ddp_check.py", "DDP-OK")
    assert res["max_diff_single"] <= 1e-10
    assert res["anchor/penalty"] > 0
    assert res["surgery_max_diff_single"] <= 1e-10 and res["surgery_effect"] > 1e-6


def test_fsdp2_penalty_gradient_equals_unsharded():
    res = torchrun("fsdp2_check.py", "FSDP2-OK")
    for case in ("lora", "full"):
        assert res[case]["max_diff_unsharded"] == 0.0
        assert res[case]["max_diff_oracle"] <= 1e-10
        assert res[case]["n_grads"] > 0
    assert res["full"]["n_gathers"] == res["full"]["n_grads"]  # one all-gather (of W - W_ref) per weight
    assert res["dora"] == "refused"


def test_dcp_resume_under_fsdp2_is_bit_exact(tmp_path):
    res = torchrun("dcp_check.py", "DCP-OK", str(tmp_path))
    for case in ("full", "lora"):
        assert res[case]["max_diff"] == 0.0
        assert res[case]["penalty"] > 0
    assert res["stripped"] == "refused"
