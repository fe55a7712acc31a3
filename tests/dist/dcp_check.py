"""torchrun --nproc_per_node=2 tests/dist/dcp_check.py CHECKPOINT_DIR  (gloo, CPU)

FSDP2 (``fully_shard``) + ``torch.distributed.checkpoint``: train, save model and
optimizer with ``get_model_state_dict`` / ``get_optimizer_state_dict`` and ``dcp.save``,
train on; then rebuild everything, ``dcp.load`` into fresh state dicts,
``set_model_state_dict`` / ``set_optimizer_state_dict``, and train the same steps. The
resumed weights equal the uninterrupted run's bit for bit, for LoRA and for full
fine-tuning (where W_ref must come back from the checkpoint: rebuilt, it would be the
resumed weights). A checkpoint whose optimizer state lost W_ref is refused.
Rank 0 prints one line ``DCP-OK {...}``.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.distributed.checkpoint as dcp  # noqa: E402
from tiny_models import anchor_deltas, tiny_llama, tiny_lora_llama, token_batches  # noqa: E402
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard  # noqa: E402

from asft_optim import AnchoredAdamW, AnchorError, Anchors  # noqa: E402

D = torch.float64
STEPS = 3


def build(case):
    """A sharded model and its anchored optimizer (built after sharding, as FSDP2 wants)."""
    if case == "full":
        model = tiny_llama(0, D, size="integration")
        for n, p in model.named_parameters():
            p.requires_grad_(n.endswith(("q_proj.weight", "v_proj.weight")))
    else:
        model = tiny_lora_llama(0, D)
    anchors = Anchors.from_deltas(anchor_deltas(model, dtype=D), "safelora", dtype=D)
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in root.model.layers:
        fully_shard(layer)
    fully_shard(model)
    opt = AnchoredAdamW(model, anchors, 0.5, lr=1e-2, weight_decay=0.0)
    return model, opt


def train(model, opt, start, steps):
    rank = dist.get_rank()
    for t in range(start, start + steps):
        ids = token_batches(1, batch=2, seed=100 * t + rank)[0]
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()


def full_weights(model):
    out = {}
    for n, p in model.named_parameters():  # same order on every rank: a collective each
        out[n] = (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
    return out


def main(path):
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results = {}
    for case in ("full", "lora"):
        ckpt = os.path.join(path, case)
        model, opt = build(case)
        train(model, opt, 0, STEPS)
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=ckpt)
        train(model, opt, STEPS, STEPS)
        want = full_weights(model)
        penalty_uninterrupted = opt.anchor_summary()["anchor/penalty"]

        model2, opt2 = build(case)
        sd = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(sd, checkpoint_id=ckpt)
        set_model_state_dict(model2, sd["model"])
        set_optimizer_state_dict(model2, opt2, sd["optim"])
        train(model2, opt2, STEPS, STEPS)
        got = full_weights(model2)
        diff = max((want[n] - got[n]).abs().max().item() for n in want)
        assert diff == 0.0, (case, diff)
        assert opt2.anchor_summary()["anchor/penalty"] == penalty_uninterrupted
        results[case] = {"max_diff": diff, "penalty": penalty_uninterrupted}

        if case == "full":
            # The same checkpoint with every W_ref stripped (what a tool that drops unknown
            # per-parameter keys would load) is refused on every rank, not resumed silently.
            model3, opt3 = build(case)
            sd3 = {"model": get_model_state_dict(model3), "optim": get_optimizer_state_dict(model3, opt3)}
            dcp.load(sd3, checkpoint_id=ckpt)
            for entry in sd3["optim"]["state"].values():
                entry.pop("anchor_ref", None)
            try:
                set_optimizer_state_dict(model3, opt3, sd3["optim"])
            except AnchorError as e:
                assert "reset_reference=True" in str(e), e
                results["stripped"] = "refused"
            else:
                raise AssertionError("a checkpoint without W_ref was loaded silently")

    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    assert all(r == gathered[0] for r in gathered), gathered
    if dist.get_rank() == 0:
        print("DCP-OK " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
    # See fsdp2_check.py: skip interpreter teardown (gloo threads can abort a rank).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
