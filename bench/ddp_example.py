"""Data-parallel training with bn_ext.SyncBatchNorm, DDP and torchrun.

    torchrun --nproc_per_node=8 bench/ddp_example.py                    # 8 GPUs, NCCL
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d \\
             --rdzv-endpoint=HOST:29500 bench/ddp_example.py            # 2 machines
    torchrun --nproc_per_node=2 bench/ddp_example.py --device cpu       # CPU, gloo

A small conv net with torch BatchNorm2d layers is converted with
bn_ext.SyncBatchNorm.convert_sync_batchnorm, wrapped in DistributedDataParallel and trained on a
synthetic classification task; each rank reads its own shard (DistributedSampler). BatchNorm
statistics are computed over the global batch (every rank's samples), parameter gradients are
averaged by DDP. At the end the script checks that every rank holds the same parameters and the
same running statistics, and evaluates.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

try:
    from bn_ext import SyncBatchNorm
except ImportError:  # until bn_ext/__init__.py exports it
    from bn_ext.sync_batchnorm import SyncBatchNorm


def make_model(num_classes: int) -> nn.Module:
    def block(cin, cout, stride):
        return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                             nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    return nn.Sequential(block(3, 32, 1), block(32, 64, 2), block(64, 128, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes))


def synthetic_data(n: int, num_classes: int, size: int, seed: int) -> TensorDataset:
    """Images whose class is the colour channel and quadrant with the brightest blob."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, size, size, generator=g) * 0.5
    y = torch.randint(0, num_classes, (n,), generator=g)
    half = size // 2
    for i in range(n):
        c, q = divmod(int(y[i]), 4)
        r0, c0 = (q // 2) * half, (q % 2) * half
        x[i, c % 3, r0:r0 + half, c0:c0 + half] += 1.5
    return TensorDataset(x, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"],
                   default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=16, help="per rank")
    p.add_argument("--samples", type=int, default=512)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args()

    # torchrun sets RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; a plain
    # `python bench/ddp_example.py` runs as a world of one.
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29512")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if args.device == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
        torch.set_num_threads(max(1, (os.cpu_count() or 1)
                                  // int(os.environ.get("LOCAL_WORLD_SIZE", 1))))
    dist.init_process_group(backend, device_id=device if args.device == "cuda" else None)
    rank, world = dist.get_rank(), dist.get_world_size()

    torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
    num_classes = 12
    model = SyncBatchNorm.convert_sync_batchnorm(make_model(num_classes)).to(device)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(memory_format=memory_format)
    ddp = DDP(model, device_ids=[local_rank] if args.device == "cuda" else None)
    opt = torch.optim.SGD(ddp.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)

    data = synthetic_data(args.samples, num_classes, args.image_size, seed=1)
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=True, seed=2)
    loader = DataLoader(data, batch_size=args.batch_size, sampler=sampler, drop_last=False)

    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)
        ddp.train()
        for step, (x, y) in enumerate(loader):
            x = x.to(device, non_blocking=True).to(memory_format=memory_format)
            y = y.to(device, non_blocking=True)
            loss = nn.functional.cross_entropy(ddp(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if step % 8 == 0:
                mean_loss = loss.detach().clone()
                dist.all_reduce(mean_loss)
                if rank == 0:
                    print(f"epoch {epoch} step {step:3d}  loss {mean_loss.item() / world:.4f}",
                          flush=True)

    # Every rank must hold the same weights (DDP) and the same BatchNorm statistics
    # (SyncBatchNorm: each rank updated them from the same global statistics).
    state = torch.cat([t.detach().double().flatten() for t in model.state_dict().values()])
    spread = torch.stack([state, -state])
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    max_diff = (spread[0] + spread[1]).max().item()
    assert max_diff == 0.0, f"ranks disagree by {max_diff}"

    # Evaluation: eval mode uses the running statistics, no communication.
    ddp.eval()
    correct = torch.zeros(2, device=device)
    with torch.no_grad():
        for x, y in DataLoader(data, batch_size=64, sampler=sampler):
            pred = ddp(x.to(device).to(memory_format=memory_format)).argmax(1)
            correct[0] += (pred == y.to(device)).sum()
            correct[1] += len(y)
    dist.all_reduce(correct)
    if rank == 0:
        print(f"{world} rank(s), {backend}: parameters and BatchNorm statistics identical on "
              f"every rank; accuracy {correct[0].item() / correct[1].item():.3f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
