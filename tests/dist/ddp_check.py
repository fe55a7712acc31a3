"""torchrun --nproc_per_node=2 tests/dist/ddp_check.py  (gloo, CPU)

DDP + AnchoredAdamW on a tiny LoRA Llama: after a few steps (one of them accumulated
under ``no_sync``) every rank holds bit-identical weights, equal to a single-process run
on the same global batches. The same with gradient surgery, each rank's safety closure on
its own half of the safety batch (the unwrapped model): the ranks average the safety
gradient, so they stay identical and equal one process on the whole safety batch. Rank 0
prints one line ``DDP-OK {...}``.
"""

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)]

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tiny_models import tiny_anchors, tiny_lora_llama, token_batches  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from asft_optim import AnchoredAdamW, GradientSurgery  # noqa: E402

D = torch.float64
STEPS, ACCUM = 3, 2  # every step accumulates ACCUM micro-batches


def run(model, anchors, micro_batches, wrap=None, safety=None):
    """``micro_batches[step][k]``: the (local) batch of micro-step k of a step; ``safety``:
    the (local) safety batch of a gradient surgery (None: no surgery)."""
    surgery = None if safety is None else GradientSurgery(
        lambda: model(input_ids=safety, labels=safety).loss, every=2, mode="always")
    opt = AnchoredAdamW(model, anchors, 0.5, lr=1e-2, weight_decay=0.0, surgery=surgery)
    net = wrap(model) if wrap else model
    for step in micro_batches:
        for k, ids in enumerate(step):
            sync = k == len(step) - 1 or wrap is None
            ctx = net.no_sync() if not sync else torch.enable_grad()
            with ctx:
                loss = net(input_ids=ids, labels=ids).loss / len(step)
                loss.backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}, opt.anchor_summary()


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    model = tiny_lora_llama(0, D)
    anchors = tiny_anchors(model, dtype=D)
    batches = token_batches(STEPS * ACCUM, batch=2 * world, seed=5)  # global batches
    glob = [batches[s * ACCUM:(s + 1) * ACCUM] for s in range(STEPS)]
    local = [[b[rank * 2:(rank + 1) * 2] for b in step] for step in glob]

    weights, summary = run(model, anchors, local, wrap=lambda m: DDP(m, gradient_as_bucket_view=True))
    safety = token_batches(1, batch=2 * world, seed=9)[0]
    surgery_model = tiny_lora_llama(0, D)
    surgery_weights, _ = run(surgery_model, anchors, local, wrap=lambda m: DDP(m, gradient_as_bucket_view=True),
                             safety=safety[rank * 2:(rank + 1) * 2])

    # One process on the whole safety batch, run on every rank: its surgery's all_reduce
    # averages equal tensors, (s + s) / 2 = s exactly.
    single_surgery, _ = run(tiny_lora_llama(0, D), anchors, glob, safety=safety)

    for w in (weights, surgery_weights):  # bit-identical across ranks
        flat = torch.cat([t.reshape(-1) for t in w.values()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        assert all(torch.equal(g, gathered[0]) for g in gathered), "ranks diverged"

    if rank == 0:
        single, single_summary = run(tiny_lora_llama(0, D), anchors, glob)
        worst = max((weights[n] - single[n]).abs().max().item() for n in single)
        moved = max((weights[n] - w0).abs().max().item()
                    for n, w0 in ((n, p.detach()) for n, p in tiny_lora_llama(0, D).named_parameters() if p.requires_grad))
        assert worst <= 1e-10, worst
        assert moved > 1e-3, moved
        assert abs(summary["anchor/penalty"] - single_summary["anchor/penalty"]) <= 1e-9
        surgery_worst = max((surgery_weights[n] - single_surgery[n]).abs().max().item() for n in single)
        surgery_effect = max((surgery_weights[n] - weights[n]).abs().max().item() for n in single)
        assert surgery_worst <= 1e-10, surgery_worst
        assert surgery_effect > 1e-6, surgery_effect
        print("DDP-OK " + json.dumps({"max_diff_single": worst, "moved": moved, "surgery_max_diff_single": surgery_worst,
                                      "surgery_effect": surgery_effect, **summary}), flush=True)
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
