"""torchrun --nproc_per_node=2 tests/dist/fsdp2_check.py  (gloo, CPU)

FSDP2 (``fully_shard``) with LoRA and with full fine-tuning: the penalty gradient the
optimizer adds to the sharded DTensor parameters, gathered, equals the one it adds to an
unsharded copy and the dense autograd oracle, and :func:`anchor_penalty`'s gradient on the
sharded model equals it bit for bit; a real training step runs. DoRA on sharded
parameters is refused with AnchorError on every rank (no hang, no wrong gradient).
Rank 0 prints one line ``FSDP2-OK {...}``.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from reference import oracle_penalty  # noqa: E402
from tiny_models import anchor_deltas, tiny_llama, tiny_lora_llama, token_batches  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from asft_optim import AnchoredAdamW, AnchorError, Anchors, anchor_penalty  # noqa: E402

D = torch.float64
LAM = 0.7


def build(case):
    if case == "full":
        model = tiny_llama(0, D, size="integration")
        g = torch.Generator().manual_seed(3)
        reference = {
            n: p.detach() + 0.05 * torch.randn(p.shape, generator=g, dtype=D)
            for n, p in model.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))
        }
        return model, reference
    return tiny_lora_llama(0, D, use_dora=(case == "dora")), None


def penalty_grads(model, anchors, reference):
    """Gradient the optimizer adds in one step (lr = 0: weights stay put)."""
    opt = AnchoredAdamW(model, anchors, LAM, lr=0.0, weight_decay=0.0, reference=reference)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    for _, p in trainable:
        p.grad = torch.zeros_like(p)
    opt.step()
    grads = {}
    for n, p in trainable:  # same order on every rank: full_tensor() is a collective
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[n] = g.clone()
    return grads, opt


def count_gathers(fn) -> int:
    """How many ``full_tensor()`` all-gathers ``fn()`` makes."""
    from torch.distributed.tensor import DTensor

    gathers, full_tensor = [], DTensor.full_tensor

    def counting(self, *args, **kwargs):
        gathers.append(tuple(self.shape))
        return full_tensor(self, *args, **kwargs)

    DTensor.full_tensor = counting
    try:
        fn()
    finally:
        DTensor.full_tensor = full_tensor
    return len(gathers)


def shard(model):
    root = model.get_base_model() if hasattr(model, "get_base_model") else model
    for layer in root.model.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def main():
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    results = {}
    for case in ("lora", "full"):
        model, reference = build(case)
        deltas = anchor_deltas(model, dtype=D)
        anchors = Anchors.from_deltas(deltas, "safelora", dtype=D)
        plain, _ = build(case)

        # Oracle: dense C, dense ΔW, autograd.
        oracle = {n: (v, "safelora", None) for n, v in deltas.items()}
        loss = oracle_penalty(plain, oracle, LAM, reference)
        loss.backward()
        want = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad and p.grad is not None}
        for p in plain.parameters():
            p.grad = None

        unsharded, _ = penalty_grads(plain, anchors, reference)
        sharded_model = shard(model)
        sample = next(p for p in sharded_model.parameters() if p.requires_grad)
        assert type(sample).__name__ == "DTensor", type(sample)
        sharded, opt = penalty_grads(sharded_model, anchors, reference)

        assert sharded.keys() == unsharded.keys()
        worst_unsharded = max((sharded[n] - unsharded[n]).abs().max().item() for n in sharded)
        nonzero = [n for n in sharded if sharded[n].abs().max() > 0]
        assert set(nonzero) == set(want), (sorted(nonzero), sorted(want))
        worst_oracle = max((sharded[n] - want[n]).abs().max().item() for n in want)
        assert worst_unsharded <= 1e-12, worst_unsharded
        assert worst_oracle <= 1e-10, worst_oracle

        # The loss-level twin on the sharded model: the optimizer's gradient, bit for bit.
        for p in sharded_model.parameters():
            p.grad = None
        anchor_penalty(sharded_model, anchors, LAM, reference=reference).backward()
        twin = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad)
                for n, p in sharded_model.named_parameters() if p.requires_grad and p.grad is not None}
        assert set(twin) == set(nonzero), (sorted(twin), sorted(nonzero))
        assert all(torch.equal(twin[n], sharded[n]) for n in nonzero)
        for p in sharded_model.parameters():
            p.grad = None

        # A real step: task backward through FSDP2, then the anchored AdamW step.
        opt.param_groups[0]["lr"] = 1e-3
        ids = token_batches(1, batch=2, seed=rank)[0]
        sharded_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        summary = opt.anchor_summary()
        assert summary["anchor/penalty"] > 0
        n_gathers = None
        if case == "full":
            # Default reference (the sharded weights at construction, DTensors): W - W_ref is
            # subtracted shard by shard and gathered once per weight, W_ref never on its own.
            fresh = AnchoredAdamW(sharded_model, anchors, LAM, lr=0.0, weight_decay=0.0)
            n_gathers = count_gathers(fresh.step)
            assert n_gathers == len(want), (n_gathers, sorted(want))
        results[case] = {"max_diff_unsharded": worst_unsharded, "max_diff_oracle": worst_oracle,
                         "n_gathers": n_gathers,
                         "n_grads": len(nonzero), "penalty": summary["anchor/penalty"]}

    # DoRA on DTensors: refused, identically on every rank.
    model, _ = build("dora")
    anchors = Anchors.from_deltas(anchor_deltas(model, dtype=D), "safelora", dtype=D)
    try:
        penalty_grads(shard(model), anchors, None)
    except AnchorError as e:
        assert "FSDP2" in str(e), e
        results["dora"] = "refused"
    else:
        raise AssertionError("DoRA on sharded parameters was not refused")

    # Ranks agree on everything they report.
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    assert all(r == gathered[0] for r in gathered), gathered
    if rank == 0:
        print("FSDP2-OK " + json.dumps(results), flush=True)
    # Both ranks leave together: a gloo rank torn down while its peer is still sending
    # aborts ("terminate called without an active exception").
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Skip interpreter teardown: gloo's background threads can still be alive when C++
    # static destructors run, which aborts a rank ("terminate called without an active
    # exception", exit -6) after the check has passed and printed. Every result is
    # flushed and the process group destroyed by now, so nothing is lost.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
