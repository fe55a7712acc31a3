"""Anchor files: exact round trips, and every defect raises AnchorError (hypothesis fuzzing)."""

from __future__ import annotations

import copy
import json
import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tiny_models import join, llama_config, model_pair, split

from asft_optim import AnchorError, Anchors, build_anchors
from asft_optim.anchor_io import checksum

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def pair():
    return model_pair(llama_config())


@pytest.fixture(scope="module")
def good_bytes(pair, tmp_path_factory):
    path = tmp_path_factory.mktemp("anchors") / "good.safetensors"
    build_anchors(*pair, ["q_proj", "v_proj"], mode="orthogonal", rank=3).save(path)
    return path.read_bytes()


@pytest.mark.parametrize(
    "kw",
    [
        dict(mode="safelora"),
        dict(mode="safelora", rank=3),
        dict(mode="orthogonal", energy=0.9),
        dict(mode="l2"),
        dict(mode="safelora", dtype=torch.bfloat16),
        dict(mode="orthogonal", rank=2, dtype=torch.float16),
    ],
)
def test_round_trip_is_exact(pair, tmp_path, kw):
    anchors = build_anchors(*pair, ["q_proj", "v_proj", "down_proj"], **kw)
    anchors.save(tmp_path / "a.safetensors")
    loaded = Anchors.load(tmp_path / "a.safetensors")
    assert list(loaded) == list(anchors)
    for k in anchors:
        assert loaded[k].factor.dtype == anchors[k].factor.dtype
        assert torch.equal(loaded[k].factor, anchors[k].factor)
        assert (loaded[k].mode, loaded[k].energy) == (anchors[k].mode, anchors[k].energy)
        assert loaded[k].factor.device.type == "cpu"
    assert loaded.weights == anchors.weights
    assert loaded.metadata == anchors.metadata


def test_from_deltas_round_trip(tmp_path):
    anchors = Anchors.from_deltas({"w.weight": torch.randn(6, 4)}, "orthogonal", rank=2)
    anchors.save(tmp_path / "d.safetensors")
    assert torch.equal(Anchors.load(tmp_path / "d.safetensors")["w.weight"].factor, anchors["w.weight"].factor)


def test_bf16_halves_size(pair):
    f32 = build_anchors(*pair, ["q_proj"])
    assert build_anchors(*pair, ["q_proj"], dtype=torch.bfloat16).nbytes * 2 == f32.nbytes


def test_unsupported_dtype(pair):
    with pytest.raises(AnchorError, match="dtype"):
        build_anchors(*pair, ["q_proj"], dtype=torch.int8)


def load_bytes(tmp_path, data: bytes) -> Anchors:
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(data)
    return Anchors.load(path)


def tensor_names(header: dict) -> list[str]:
    return sorted(k for k in header if k != "__metadata__")


# -- targeted defects -----------------------------------------------------------------------


def test_not_an_anchor_file(tmp_path, pair):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2, 2)}, tmp_path / "plain.safetensors")
    with pytest.raises(AnchorError, match="not an anchor file"):
        Anchors.load(tmp_path / "plain.safetensors")
    torch.save(pair[0].state_dict(), tmp_path / "pickle.bin")
    with pytest.raises(AnchorError):
        Anchors.load(tmp_path / "pickle.bin")
    with pytest.raises(AnchorError):
        Anchors.load(tmp_path / "missing.safetensors")


def test_nan_with_valid_checksum_is_rejected(tmp_path, good_bytes):
    header, body = split(good_bytes)
    name = tensor_names(header)[0]
    begin = header[name]["data_offsets"][0]
    body = body[:begin] + struct.pack("<f", math.nan) + body[begin + 4:]
    # Re-sign the data so only the finiteness check can catch it.
    path = tmp_path / "nan.safetensors"
    path.write_bytes(join(header, body))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header["__metadata__"]["checksum"] = checksum(tensors, header["__metadata__"])
    with pytest.raises(AnchorError, match="non-finite"):
        load_bytes(tmp_path, join(header, body))


def test_tampered_data_is_rejected(tmp_path, good_bytes):
    header, body = split(good_bytes)
    body = bytes([body[0] ^ 0x01]) + body[1:]
    with pytest.raises(AnchorError, match="checksum"):
        load_bytes(tmp_path, join(header, body))


def test_version_and_dtype_checks(tmp_path, good_bytes):
    header, body = split(good_bytes)
    header["__metadata__"]["format_version"] = "99"
    with pytest.raises(AnchorError, match="version '99'.*asft anchors build"):
        load_bytes(tmp_path, join(header, body))
    header, body = split(good_bytes)
    header["__metadata__"]["dtype"] = "bfloat16"
    with pytest.raises(AnchorError, match="dtype"):
        load_bytes(tmp_path, join(header, body))


def test_saving_a_factor_without_orthogonal_columns_converts_it(tmp_path):
    from asft_optim import Projection

    f = torch.randn(6, 4, dtype=torch.float64)
    Anchors({"w.weight": Projection(f, "safelora")}, {}).save(tmp_path / "a.safetensors")
    p = Anchors.load(tmp_path / "a.safetensors")["w.weight"]
    assert p.orthogonal_columns
    torch.testing.assert_close(p.factor @ p.factor.T, f @ f.T, atol=1e-12, rtol=1e-10)


# -- fuzzing: whatever happens, it is an AnchorError ----------------------------------------


def expect_anchor_error_or_valid(tmp_path, data: bytes) -> None:
    try:
        anchors = load_bytes(tmp_path, data)
    except AnchorError:
        return
    for p in anchors.values():  # a benign edit (e.g. whitespace) must still load cleanly
        assert torch.isfinite(p.factor).all()


@FUZZ
@given(cut=st.integers(min_value=0, max_value=10**9))
def test_fuzz_truncation(tmp_path, good_bytes, cut):
    cut %= len(good_bytes)
    with pytest.raises(AnchorError):
        load_bytes(tmp_path, good_bytes[:cut])


@FUZZ
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(1, 255)), min_size=1, max_size=4))
def test_fuzz_byte_flips(tmp_path, good_bytes, flips):
    data = bytearray(good_bytes)
    for pos, mask in flips:
        data[pos % len(data)] ^= mask
    expect_anchor_error_or_valid(tmp_path, bytes(data))


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


@FUZZ
@given(data=st.data())
def test_fuzz_metadata_edits(tmp_path, good_bytes, data):
    header, body = split(good_bytes)
    meta = header["__metadata__"]
    key = data.draw(st.sampled_from(sorted(meta) + ["weights/entry"]))
    if key == "weights/entry":
        weights = json.loads(meta["weights"])
        name = data.draw(st.sampled_from(sorted(weights)))
        field = data.draw(st.sampled_from(["shape", "layout", "mode", "rank", "energy", "extra"]))
        weights[name][field] = data.draw(json_values)
        if data.draw(st.booleans()):
            weights[data.draw(st.text(max_size=5))] = weights.pop(name)
        meta["weights"] = json.dumps(weights)
    elif data.draw(st.booleans()):
        meta[key] = data.draw(st.text(max_size=20) | json_values.map(json.dumps))
    else:
        del meta[key]
    expect_anchor_error_or_valid(tmp_path, join(header, body))


@FUZZ
@given(data=st.data())
def test_fuzz_tensor_dtype_and_shape(tmp_path, good_bytes, data):
    header, body = split(good_bytes)
    name = data.draw(st.sampled_from(tensor_names(header)))
    entry = header[name]
    what = data.draw(st.sampled_from(["dtype", "shape", "offsets", "drop", "rename"]))
    if what == "dtype":
        entry["dtype"] = data.draw(st.sampled_from(["F16", "BF16", "F64", "I32", "U8", "BOOL", "F8_E4M3", "X"]))
    elif what == "shape":
        entry["shape"] = data.draw(st.lists(st.integers(0, 64), max_size=4))
    elif what == "offsets":
        entry["data_offsets"] = data.draw(st.lists(st.integers(-5, len(body) + 5), min_size=0, max_size=3))
    elif what == "drop":
        del header[name]
    else:
        header[data.draw(st.text(min_size=1, max_size=6))] = header.pop(name)
    expect_anchor_error_or_valid(tmp_path, join(header, body))


def test_loaded_bf16_anchors_drive_the_penalty(pair, tmp_path):
    """A saved/loaded bf16 file gives the formula's penalty; factors stay bf16 on the CPU."""
    peft = pytest.importorskip("peft")
    from asft_optim import AnchoredAdamW, anchor_penalty

    base, aligned = pair
    build_anchors(base, aligned, ["q_proj", "v_proj"], dtype=torch.bfloat16).save(tmp_path / "a.safetensors")
    loaded = Anchors.load(tmp_path / "a.safetensors")
    torch.manual_seed(1)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    assert loaded.bind(model, warn=False).unanchored == []
    # Oracle: dense C = V Vᵀ/‖V‖_F in float64 from the two models, ΔW = s·B·A.
    expected = 0.0
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            key = name.removeprefix("base_model.model.") + ".weight"
            v = (aligned.state_dict()[key] - base.state_dict()[key]).double()
            c = v @ v.T / torch.linalg.matrix_norm(v)
            with torch.no_grad():
                dw = module.scaling["default"] * (module.lora_B["default"].weight @ module.lora_A["default"].weight).double()
            expected += float(((torch.eye(c.shape[0], dtype=c.dtype) - c) @ dw).pow(2).sum())
    got = float(anchor_penalty(model, loaded))
    assert expected > 0 and got == pytest.approx(expected, rel=2e-2)  # bf16 storage
    opt = AnchoredAdamW(model, loaded, anchor_lambda=1.0, lr=1e-3)
    model(torch.tensor([[1, 2, 3]])).logits.sum().backward()
    opt.step()
    assert all(p.factor.dtype == torch.bfloat16 and p.factor.device.type == "cpu" for p in loaded.values())


# -- the three containers' files, byte for byte as before OperatorMapping -------------------

Q, DOWN = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight"


def _fixed_containers() -> dict:
    """One container of each kind, from exactly representable tensors (no SVD, no QR)."""
    from asft_optim.input_anchors import InputAnchors
    from asft_optim.input_projection import InputProjection
    from asft_optim.layout import WeightInfo
    from asft_optim.projection import Projection
    from asft_optim.refusal_gradients import SafetySubspaces
    from asft_optim.safety_subspace import SafetySubspace

    f = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.0], [0.0, 0.0]])
    return {
        "anchors": Anchors({Q: Projection(f, "orthogonal", 0.75, orthogonal_columns=True)},
                           {"mode": "orthogonal", "note": "fixed"}, {Q: WeightInfo((4, 3))}),
        "input": InputAnchors({DOWN: InputProjection(torch.eye(3)[:, :2], 4, 0.5)}, {"side": "input", "source": "fixed"}),
        "gradient": SafetySubspaces({Q: SafetySubspace(torch.tensor([[0.6], [0.8], [0.0], [0.0]]), 3, 0.875)},
                                    {"source": "fixed"}),
    }


def _entry(side: str | None, mode: str, energy: float, rank: int) -> dict:
    return {"energy": energy, "layout": "out_in", "mode": mode, "rank": rank, "shape": [4, 3]} | (
        {"side": side} if side else {})


# The headers these containers' files had when each container still had its own code
# (commit 2091607, written by that code): the checksum covers every other entry and the
# tensors' bytes, so an equal header is an equal file to every reader.
_HEADERS = {
    "anchors": ({"checksum": "96feed6eceb69cab95e36ed44f8f80dea5c69a610aea48bf2f7112107cb613ca",
                 "mode": "orthogonal", "note": "fixed"}, {Q: _entry(None, "orthogonal", 0.75, 2)}, {Q: ["F32", [4, 2]]}),
    "input": ({"checksum": "2f214df2ae631cd3e9508fac01566a50c486c34a105bafb2cb61bb778b8124b2",
               "side": "input", "source": "fixed"}, {DOWN: _entry("input", "input", 0.5, 2)}, {DOWN: ["F32", [3, 2]]}),
    "gradient": ({"checksum": "91e66a3a18af8ccd8bb1ad697d240e52f3883a5f44d0a4a549b7fdf7b4ab9d81",
                  "side": "gradient", "source": "fixed"}, {Q: _entry("gradient", "gradient", 0.875, 1)}, {Q: ["F32", [4, 1]]}),
}


@pytest.mark.parametrize("kind", list(_HEADERS))
def test_each_container_writes_the_header_it_always_wrote_and_reads_it_back(tmp_path, kind):
    container = _fixed_containers()[kind]
    path = tmp_path / f"{kind}.safetensors"
    container.save(path)
    header, body = split(path.read_bytes())
    meta, entries, tensors = _HEADERS[kind]
    assert set(header["__metadata__"]) == {"format", "format_version", "dtype", "weights", *meta}
    assert header["__metadata__"] == {"format": "asft-anchors", "format_version": "3", "dtype": "float32",
                                      "weights": json.dumps(entries, sort_keys=True), **meta}
    assert {k: [v["dtype"], v["shape"]] for k, v in header.items() if k != "__metadata__"} == tensors
    loaded = type(container).load(path)
    assert list(loaded) == list(container) and loaded.weights == container.weights
    assert loaded.metadata == {k: v for k, v in container.metadata.items() if k != "side"}
    for name, op in container.items():
        assert [torch.equal(a, b) for a, b in zip(loaded[name].state_tensors(), op.state_tensors(), strict=True)] == [True]
        assert (loaded[name].d_out, loaded[name].d_in, loaded[name].energy) == (op.d_out, op.d_in, op.energy)
    loaded.save(tmp_path / "again.safetensors")  # a loaded file saves to the same header and data
    assert split((tmp_path / "again.safetensors").read_bytes()) == (header, body)


@pytest.mark.parametrize("kind, empty", [("anchors", "anchors"), ("input", "input anchors"),
                                         ("gradient", "safety subspaces")])
def test_the_three_containers_share_one_mapping_contract(kind, empty):
    from asft_optim.layout import WeightInfo

    container = _fixed_containers()[kind]
    cls, (name,) = type(container), list(container)
    numel = sum(t.numel() for t in container[name].state_tensors())
    assert len(container) == 1 and name in container and container.nbytes == 4 * numel  # float32
    assert repr(container).startswith(f"{cls.__name__}(1 weights, ")
    with pytest.raises(TypeError):
        container[name] = container[name]  # read-only
    wide = container.to(dtype=torch.float64)
    assert type(wide) is cls and list(wide) == [name] and wide.nbytes == 8 * numel
    assert (wide.weights, wide.metadata) == (container.weights, container.metadata)
    assert all(t.dtype == torch.float64 for t in wide[name].state_tensors())
    with pytest.raises(AnchorError, match=f"^{empty} are empty: no weight matched"):
        cls({})
    with pytest.raises(AnchorError, match=f"^{name}: "):  # 5 outputs: no operator here fits
        cls({name: container[name]}, weights={name: WeightInfo((5, 3))})


def test_a_subspace_without_its_input_size_needs_its_weight_info():
    from asft_optim.layout import WeightInfo
    from asft_optim.refusal_gradients import SafetySubspaces
    from asft_optim.safety_subspace import SafetySubspace

    sub = SafetySubspace(torch.tensor([[0.6], [0.8], [0.0], [0.0]]))
    with pytest.raises(AnchorError, match=f"{Q}: give its WeightInfo"):
        SafetySubspaces({Q: sub})
    assert SafetySubspaces({Q: sub}, weights={Q: WeightInfo((4, 7))}).weights[Q].out_in_shape == (4, 7)
