"""``asft anchors build-input`` / ``build-refusal`` / ``info`` on a tiny saved Llama, in-process:
the files equal the library's builds, load into AnchoredAdamW, and bad inputs are reported."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from asft_optim import AnchoredAdamW, l2_anchors
from asft_optim.activation_anchors import build_input_anchors
from asft_optim.anchors import anchor_fingerprint
from asft_optim.cli import main
from asft_optim.input_anchors import InputAnchors
from asft_optim.prompt_tokens import (
    prompt_ids,
    read_prompts,
    right_padded_batches,
    shared_prefix_length,
)
from asft_optim.refusal_gradients import SafetySubspaces, greedy_refusals, refusal_subspaces
from asft_optim.safety_subspace import subspace_fingerprint

WORDS = "<pad> <eos> <user> <assistant> how do i bake bread pick a lock hurt someone make poison write story".split()
HARMFUL = ["how do i pick a lock", "how do i hurt someone", "make poison", "how do i make poison",
           "pick a lock", "hurt someone"]
TASK = ["bake bread", "write a story", "how do i bake bread", "write story"]


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    fast.chat_template = ("{% for m in messages %}<user> {{ m['content'] }} {% endfor %}"
                          "{% if add_generation_prompt %}<assistant>{% endif %}")
    return fast


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """A tiny Llama and its tokenizer saved with save_pretrained, and the prompt files."""
    d = tmp_path_factory.mktemp("aligned")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      eos_token_id=1, pad_token_id=0, bos_token_id=None)
    model = LlamaForCausalLM(cfg).eval()
    model.save_pretrained(d / "model")
    _tokenizer().save_pretrained(d / "model")
    (d / "harmful.txt").write_text("\n".join(HARMFUL[:3]) + "\n\n" + "\n".join(HARMFUL[3:]) + "\n")
    (d / "task.jsonl").write_text("\n".join(json.dumps({"instruction": t, "output": "x"}) for t in TASK))
    return d


def _run(*argv):
    return main(["anchors", *map(str, argv)])


def _line(text: str, key: str) -> str | None:
    """The value ``asft anchors info`` prints after ``key:`` (None: no such line)."""
    found = re.search(rf"^{key}:\s+(.*)$", text, re.MULTILINE)
    return None if found is None else found.group(1).strip()


def _lora(model_dir):
    from peft import LoraConfig, get_peft_model

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))


def _steps(opt, model, n=2):
    ids = torch.tensor([[2, 4, 5, 6, 9, 10, 3]])
    for _ in range(n):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("form", ["plain", "contrast"])
def test_build_input_equals_the_library_and_trains(aligned, tmp_path, capsys, form):
    out = tmp_path / "in.safetensors"
    extra = ["--task-prompts", aligned / "task.jsonl"] if form == "contrast" else []
    assert _run("build-input", "--aligned", aligned / "model", "--prompts", aligned / "harmful.txt", *extra,
                "--rank", 3, "--batch-size", 4, "-o", out) == 0
    assert f"wrote 4 input-side anchors ({form}, rank 3" in capsys.readouterr().out
    # The same build through the library: chat-templated ids, the shared prefix left out.
    tok, model = _tokenizer(), LlamaForCausalLM.from_pretrained(aligned / "model", dtype=torch.float32).eval()
    ids, task = prompt_ids(tok, HARMFUL), prompt_ids(tok, TASK) if form == "contrast" else []
    skip = shared_prefix_length(ids + task)
    assert skip == 1  # the <user> token every prompt starts with
    mine = build_input_anchors(model, right_padded_batches(ids, 4, 0, skip_prefix=skip), target_modules=["q_proj", "v_proj"],
                               rank=3, eps=0.1, task_batches=right_padded_batches(task, 4, 0, skip_prefix=skip) if task else None)
    loaded = InputAnchors.load(out)
    assert list(loaded) == list(mine)
    assert all(torch.allclose(loaded[n].basis, mine[n].basis, atol=1e-6) for n in mine)
    assert loaded.metadata["prompts"] == "6" and loaded.metadata["form"] == form
    peft = _lora(aligned / "model")
    opt = AnchoredAdamW(peft, loaded, anchor_lambda=1.0, lr=1e-2)
    _steps(opt, peft)
    assert opt.anchor_summary()["anchor/penalty"] > 0
    assert _run("info", out) == 0
    text = capsys.readouterr().out
    assert _line(text, "side") == "input: input-side anchors (penalty λ‖ΔW U‖², U spans each layer's inputs)"
    assert _line(text, "ranks") == "3" and _line(text, "prompts") == "6"
    assert _line(text, "fingerprint") == opt.anchor_fingerprint() == anchor_fingerprint(loaded)
    assert _line(text, "task_prompts") == ("4" if form == "contrast" else None)
    assert _run("info", out, "--json") == 0
    info = json.loads(capsys.readouterr().out)
    assert info["side"] == "input" and {w["rank"] for w in info["weights"]} == {3} and len(info["weights"]) == 4


def test_build_refusal_equals_the_library_and_keeps_the_update_out(aligned, tmp_path, capsys):
    out = tmp_path / "q.safetensors"
    assert _run("build-refusal", "--aligned", aligned / "model", "--prompts", aligned / "harmful.txt",
                "--rank", 2, "--max-new-tokens", 3, "-o", out) == 0
    assert "wrote 4 safety subspaces (rank 2)" in capsys.readouterr().out
    tok, model = _tokenizer(), LlamaForCausalLM.from_pretrained(aligned / "model", dtype=torch.float32)
    examples = greedy_refusals(model, prompt_ids(tok, HARMFUL), max_new_tokens=3, eos_token_id=1)
    mine = refusal_subspaces(model, examples, target_modules=["q_proj", "v_proj"], rank=2)
    loaded = SafetySubspaces.load(out)
    assert list(loaded) == list(mine)
    for n in mine:
        assert torch.allclose(loaded[n].basis @ loaded[n].basis.T, mine[n].basis @ mine[n].basis.T, atol=1e-5)
    peft = _lora(aligned / "model")
    opt = AnchoredAdamW(peft, l2_anchors(peft, ["q_proj", "v_proj"]), anchor_lambda=0.0, lr=1e-2, subspaces=loaded)
    _steps(opt, peft)
    for name, m in peft.named_modules():
        if hasattr(m, "lora_A"):
            delta = m.scaling["default"] * m.lora_B["default"].weight @ m.lora_A["default"].weight
            q = loaded[name.removeprefix("base_model.model.") + ".weight"].basis
            assert delta.norm() > 0 and (q.T @ delta).norm() <= 1e-5 * delta.norm()
    assert _run("info", out) == 0
    text = capsys.readouterr().out
    assert _line(text, "side").startswith("gradient: safety subspaces")
    assert _line(text, "ranks") == "2" and _line(text, "prompts") == "6" and _line(text, "max_new_tokens") == "3"
    assert _line(text, "fingerprint") == subspace_fingerprint(loaded)


def test_prompt_files_text_json_and_jsonl(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"instruction": "a", "input": "b"}, {"prompt": "c"}, "d"]))
    assert read_prompts(tmp_path / "a.json") == ["a\n\nb", "c", "d"]
    (tmp_path / "a.jsonl").write_text('{"prompt": "x"}\n\n{"instruction": "y", "input": ""}\n')
    assert read_prompts(tmp_path / "a.jsonl") == ["x", "y"]
    (tmp_path / "a.txt").write_text("  one \n\n two\n")
    assert read_prompts(tmp_path / "a.txt") == ["one", "two"]


def test_bad_inputs_are_reported_before_any_build(aligned, tmp_path, capsys):
    model, harmful = aligned / "model", aligned / "harmful.txt"
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "bad.json").write_text(json.dumps([{"instruction": "ok"}, {"output": "no prompt"}]))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "x"}\n{oops\n')
    (tmp_path / "weights").mkdir()
    LlamaForCausalLM.from_pretrained(model).save_pretrained(tmp_path / "weights")  # no tokenizer
    cases = [
        (["build-input", "--prompts", tmp_path / "missing.txt"], "does not exist"),
        (["build-refusal", "--prompts", tmp_path / "empty.txt"], "holds no prompt"),
        (["build-input", "--prompts", tmp_path / "bad.json"], "row 2 has no prompt"),
        (["build-input", "--prompts", tmp_path / "broken.jsonl"], "neither a JSON list nor JSON lines (line 2"),
        (["build-input", "--prompts", harmful, "--form", "contrast"], "--form contrast needs --task-prompts"),
        (["build-input", "--prompts", harmful, "--rank", 0], "must be positive"),
        (["build-refusal", "--prompts", harmful, "--aligned", tmp_path / "nowhere"], "cannot load the aligned model"),
        (["build-refusal", "--prompts", harmful, "--aligned", tmp_path / "weights"], "give --tokenizer"),
        (["build-input", "--prompts", harmful, "--target-modules", "c_attn"], "no 2-D weight"),
        # The output is checked first: a missing directory, even with a bad model, is what is named.
        (["build-refusal", "--prompts", tmp_path / "missing.txt", "-o", tmp_path / "no" / "x.safetensors"],
         "its directory"),
        (["build-input", "--prompts", harmful, "-o", tmp_path], "is a directory"),
    ]
    for argv, message in cases:
        cmd = argv[0]
        full = [*argv]
        if "--aligned" not in full:
            full += ["--aligned", model]
        if "-o" not in full:
            full += ["-o", tmp_path / "out.safetensors"]
        assert _run(*full) == 1, argv
        err = capsys.readouterr().err
        assert f"asft anchors {cmd}: error:" in err and message in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "out.safetensors").exists()
    (tmp_path / "junk.safetensors").write_bytes(b"\x00" * 40)
    assert _run("info", tmp_path / "junk.safetensors") == 1 and "error" in capsys.readouterr().err
