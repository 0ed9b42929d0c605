"""FSDP2 training with momentum_fused.Muon and its aux AdamW, and a distributed checkpoint round trip.

    python examples/fsdp2_muon.py                       # 2 gloo processes on the CPU, 20 steps
    python examples/fsdp2_muon.py --device cuda --world 2   # NCCL, one GPU per process
    torchrun --nproc-per-node 2 examples/fsdp2_muon.py   # the same under torchrun (it sets RANK / WORLD_SIZE)

What it shows (docs/ecosystem.md, docs/muon.md):
1. ``fully_shard`` on each block and the root, then ONE optimizer over the sharded params: the 2-D hidden weights in
   a Muon group (Newton-Schulz on whole matrices: each matrix is gathered to an owner rank and its rows sent back,
   two ``all_to_all_single`` per step), the embedding, head, gains and biases in a ``use_muon=False`` group stepped
   by AdamW, as the reference MuonWithAuxAdam.
2. Each step's host side is the cached plan on the DTensors' local shards after the first steps (bench:
   ``python -m bench.bench_muon_fsdp``).
3. ``torch.distributed.checkpoint`` saves the sharded model and optimizer (``get_state_dict``) and loads them into a
   fresh model and optimizer (``set_state_dict``); the next steps then equal those of the run that never stopped,
   bit for bit (the script checks it and prints the largest difference).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="steps before the checkpoint (then 3 more after it)")
    ap.add_argument("--world", type=int, default=2, help="processes to spawn (ignored under torchrun)")
    ap.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--ckpt", default=None, help="checkpoint directory (default: a temporary one)")
    args = ap.parse_args(argv)
    if args.device == "cuda":  # (checked here: in the spawned ranks it was a traceback from torch.cuda.set_device)
        import torch
        if not torch.cuda.is_available():
            ap.error("--device cuda: no CUDA device visible to this torch")
        if torch.cuda.device_count() < args.world and "LOCAL_RANK" not in os.environ:
            ap.error(f"--device cuda --world {args.world}: only {torch.cuda.device_count()} CUDA device(s), one "
                     "per rank needed")
    return args


def make_model(width, blocks, vocab=97):
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(width)
            self.up = nn.Linear(width, 4 * width)
            self.down = nn.Linear(4 * width, width)

        def forward(self, x):
            return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(vocab, width)
            self.blocks = nn.ModuleList([Block() for _ in range(blocks)])
            self.head = nn.Linear(width, vocab)

        def forward(self, tokens):  # -> logits [batch * seq, vocab] (a 2-D matmul's output, not a view)
            x = self.embed(tokens)
            for b in self.blocks:
                x = b(x)
            return self.head(x.flatten(0, 1))

    return Net()


def build(args, device, mesh):
    """A fresh model (same init on every rank and every call), sharded, and its optimizer."""
    import torch
    from torch.distributed.fsdp import fully_shard

    import momentum_fused as mf

    torch.manual_seed(0)
    model = make_model(args.width, args.blocks).to(device)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    # Muon for the hidden matrices; AdamW for the embedding, the head (not hidden layers: MuonWithAuxAdam's advice),
    # and every 0-d / 1-d param
    hidden = [p for n, p in model.named_parameters() if p.dim() == 2 and n.startswith("blocks.")]
    others = [p for n, p in model.named_parameters() if not (p.dim() == 2 and n.startswith("blocks."))]
    opt = mf.Muon([dict(params=hidden), dict(params=others, use_muon=False, lr=3e-3, weight_decay=0.0)],
                  lr=0.02, weight_decay=0.1)
    return model, opt


def batches(rank, device, steps, vocab=97, batch=8, seq=16):
    """Each rank's own data (as a data-parallel loader would give), the same on every run: random tokens, each
    followed by (3 t + 1) mod vocab, a rule the model can learn."""
    import torch
    g = torch.Generator().manual_seed(1000 + rank)
    for _ in range(steps):
        x = torch.randint(0, vocab, (batch, seq), generator=g)
        yield x.to(device), ((3 * x + 1) % vocab).to(device)


def train(model, opt, data):
    import torch
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y.flatten())
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def worker(rank, world, args, ckpt):
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    torch.set_num_threads(1)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    device = torch.device(args.device, rank) if cuda else torch.device("cpu")
    mesh = init_device_mesh(args.device, (world,))
    if args.ckpt is None:  # under torchrun each rank made its own temporary directory: all use rank 0's (one
        where = [ckpt]     # machine; across machines pass --ckpt on a shared filesystem)
        dist.broadcast_object_list(where, src=0)
        ckpt = where[0]
    data = list(batches(rank, device, args.steps + 3))

    model, opt = build(args, device, mesh)
    losses = train(model, opt, data[:args.steps])
    sd_model, sd_opt = get_state_dict(model, opt)
    dcp.save({"model": sd_model, "optim": sd_opt}, checkpoint_id=ckpt)
    train(model, opt, data[args.steps:])  # the run that never stopped

    fresh, fresh_opt = build(args, device, mesh)  # a new process would start here
    sd_model, sd_opt = get_state_dict(fresh, fresh_opt)
    state = {"model": sd_model, "optim": sd_opt}
    dcp.load(state, checkpoint_id=ckpt)
    set_state_dict(fresh, fresh_opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    train(fresh, fresh_opt, data[args.steps:])

    with torch.no_grad():
        diff = max(float((a.full_tensor() - b.full_tensor()).abs().max())
                   for a, b in zip(model.parameters(), fresh.parameters()))
    if rank == 0:
        print(f"{world} ranks ({args.device}), {args.steps} steps: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
        print(f"resumed from the distributed checkpoint, 3 more steps: largest param difference to the uninterrupted "
              f"run {diff:.3g}")
    dist.barrier()
    dist.destroy_process_group()
    if diff != 0.0:
        raise SystemExit(f"rank {rank}: the resumed run differs from the uninterrupted one by {diff}")


def _spawned(rank, world, args, ckpt, port):
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    worker(rank, world, args, ckpt)
    # Done (an error raised above exits as usual). Leave without the interpreter's finalization: gloo's worker
    # threads can still release tensors there and abort the process ("terminate called without an active
    # exception", pytorch/pytorch#179291; this example's test failed so twice under load, 2026-12-04 and 12-06).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or os.path.join(tmp, "ckpt")
        if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun
            worker(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), args, ckpt)
            return 0
        import socket

        import torch.multiprocessing as mp
        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.spawn(_spawned, args=(args.world, args, ckpt, port), nprocs=args.world, join=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
