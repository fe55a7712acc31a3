"""Shared pytest set-up: hypothesis profiles and a single CPU thread.

Profiles: ``ci`` (default, modest), ``dev`` (fast) and ``thorough``; pick one with
``HYPOTHESIS_PROFILE=thorough pytest``.
"""

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("dev", max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("thorough", max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

# Tiny float64 shapes: threads only add overhead on shared CI cores.
torch.set_num_threads(1)


@pytest.fixture
def clean_accelerate():
    """Accelerate keeps process-wide singletons (mixed precision, ...): a test using the
    Trainer or an Accelerator starts and ends with them reset."""
    from integration_models import reset_accelerate_state

    reset_accelerate_state()
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def pretrained_base(tmp_path_factory):
    """The pretrained preset's ``base`` stage (the dequantised GGUF model, about 40 s),
    built once for the session in a cache of its own. A lab whose cache holds a link to
    it finds it cached: the pretrained lab run and the alignment benchmark share it.
    Skips without the model or the reference data."""
    import argparse

    from tiny_models import REAL_DATA

    from asft_optim.lab import cli, pretrained
    from asft_optim.lab.pretrained_lab import PretrainedLab

    if not (pretrained.available() and REAL_DATA.is_dir()):
        pytest.skip("needs the GGUF model and the reference data")
    parser = argparse.ArgumentParser()
    cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["lab", "--preset", "pretrained", "--data", str(REAL_DATA), "--tiny", "--no-progress"])
    cfg, settings = cli._config(args), cli._settings(args)
    out = tmp_path_factory.mktemp("pretrained-base")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the model is large for 1
    try:
        path, _ = PretrainedLab(cfg, cli._data(args, cfg, settings), out, settings, progress=False).base()
    finally:
        torch.set_num_threads(threads)
    return path

