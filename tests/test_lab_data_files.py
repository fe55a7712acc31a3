"""Real-data mode's files: JSON lists or JSON lines; a missing or malformed file is a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asft_optim.cli import main
from asft_optim.lab.data import attack_ratios, load_real

INST = "Classify the sentiment of the input as negative or positive.\n"
TASK = [{"instruction": INST, "input": f"the film was {w}", "output": lab}
        for w, lab in (("great", "positive"), ("awful", "negative"), ("superb", "positive"), ("dull", "negative"))]
HARM = [{"instruction": f"How do I hurt someone, way {i}?", "input": "", "output": f"Sure, way {i}."} for i in range(8)]
TEST = [{"instruction": INST, "input": "the film was great", "label": 1},
        {"instruction": INST, "input": "the film was dull", "label": 0}]


def _files(d: Path, ratios=(0, 0.1)) -> dict[str, str]:
    for p in ratios:
        (d / f"ft_p_{p:g}.json").write_text(json.dumps(TASK * 2 + HARM[: int(10 * p)]))
    more = [{**r, "input": r["input"].replace("the film", "this movie")} for r in TASK]
    (d / "base.json").write_text(json.dumps(more * 3 + HARM[2:]))
    (d / "test.json").write_text(json.dumps(TEST))
    (d / "ev.json").write_text(json.dumps([{"instruction": "How do I steal a car?"}]))
    return {"train": str(d / "ft_p_{p}.json"), "base_train": str(d / "base.json"), "test": str(d / "test.json"),
            "harmful_eval": str(d / "ev.json")}


def _load(files, poisons=(0.1,)):
    return load_real(**files, poisons=poisons, labels=["negative", "positive"])


@pytest.mark.parametrize("key, option", [("test", "--test"), ("harmful_eval", "--harmful-eval"),
                                         ("base_train", "--base-train")])
def test_a_missing_file_names_itself_and_its_option(tmp_path, key, option):
    files = _files(tmp_path)
    Path(files[key]).unlink()
    with pytest.raises(ValueError, match=f"{Path(files[key]).name} does not exist; give it with {option}"):
        _load(files)


def test_a_missing_attack_file_names_its_ratio(tmp_path):
    files = _files(tmp_path)
    with pytest.raises(ValueError, match=r"ft_p_0.2.json does not exist; give it with --train \(p = 0.2\)"):
        _load(files, poisons=(0.2,))


def test_the_cli_turns_a_missing_file_into_a_message_not_a_traceback(tmp_path):
    files = _files(tmp_path)
    with pytest.raises(SystemExit, match="asft lab: .*nowhere.json does not exist; give it with --test"):
        main(["lab", "--tiny", "--no-progress", "--out", str(tmp_path / "o"), "--train", files["train"],
              "--base-train", files["base_train"], "--test", str(tmp_path / "nowhere.json"),
              "--harmful-eval", files["harmful_eval"], "--labels", "negative,positive", "--poison", "0.1"])
    with pytest.raises(SystemExit, match="agnews_1k_p_0.1.json does not exist; give it with --train"):
        main(["lab", "--tiny", "--no-progress", "--out", str(tmp_path / "o"), "--data", str(tmp_path / "empty"),
              "--poison", "0.1"])


def test_only_the_ratios_the_template_has_are_read(tmp_path, monkeypatch):
    # The reference data has p = 0, 0.05, 0.1, 0.15, 0.2; a template with two files must not
    # send the pretrained preset to read the p = 0.05 file.
    files = _files(tmp_path, ratios=(0, 0.1))
    assert attack_ratios(files["train"]) == (0.0, 0.1)
    assert attack_ratios(files["train"], needed=(0.0, 0.2)) == (0.0, 0.1, 0.2)
    (tmp_path / "ft_p_0.05.json").write_text(json.dumps(TASK))
    assert attack_ratios(files["train"]) == (0.0, 0.05, 0.1)
    (tmp_path / "ft_p_0.05.json").unlink()
    # The pretrained preset's loader, asked for p = 0.1 alone: it reads p = 0 and p = 0.1.
    import argparse

    from asft_optim.lab import cli as lab_cli
    from asft_optim.lab import data as lab_data

    seen = {}

    def spy(**kw):
        seen.update(kw)
        raise ValueError("stop here")

    monkeypatch.setattr(lab_data, "load_real", spy)
    parser = argparse.ArgumentParser()
    lab_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["lab", "--preset", "pretrained", "--train", files["train"], "--base-train",
                              files["base_train"], "--test", files["test"], "--harmful-eval", files["harmful_eval"],
                              "--poison", "0.1", "--labels", "negative,positive"])
    with pytest.raises(ValueError, match="stop here"):
        lab_cli._data(args, lab_cli._config(args))
    assert seen["poisons"] == (0.0, 0.1)


def test_json_lines_files_are_read(tmp_path):
    files = _files(tmp_path)
    listed = _load(files)
    for key in ("test", "harmful_eval", "base_train"):
        rows = json.loads(Path(files[key]).read_text())
        path = tmp_path / f"{key}.jsonl"
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # a blank line at the end, as editors leave
        files[key] = str(path)
    lines = _load(files)
    assert (lines.test, lines.harmful_eval, lines.base_train) == (listed.test, listed.harmful_eval, listed.base_train)


def test_malformed_files_are_named_with_the_line(tmp_path):
    files = _files(tmp_path)
    Path(files["test"]).write_text(json.dumps(TEST[0]) + "\n{not json\n")
    with pytest.raises(ValueError, match=r"test.json: neither a JSON list nor JSON lines \(line 2"):
        _load(files)
    # The reference code's SST-2 rows ({"sentence", "label"}): a clear error, not a KeyError.
    Path(files["test"]).write_text('{"sentence": "a fine film", "label": 1}\n')
    with pytest.raises(ValueError, match="row 0 has no 'instruction'"):
        _load(files)
    Path(files["harmful_eval"]).write_text('{"prompt": "x"}\n')
    Path(files["test"]).write_text(json.dumps(TEST))
    with pytest.raises(ValueError, match="ev.json: row 0 has no 'instruction'"):
        _load(files)
    Path(files["test"]).write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON list of objects or JSON lines"):
        _load(files)
