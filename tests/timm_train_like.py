"""A stand-in for timm's train.py (which is not vendored): it builds its optimizer exactly as timm's does,
``create_optimizer_v2(model, opt=..., lr=..., **args.opt_kwargs)`` with ``--opt-kwargs`` parsed by timm's
``ParseKwargs``, never imports itop_timm, checkpoints ``optimizer.state_dict()`` with ``torch.save`` and
resumes with ``--resume``. Under torchrun it trains DDP over gloo. Writes ``<output>/rank<r>.json``."""

import argparse
import json
import os
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm.optim import create_optimizer_v2
from timm.utils import ParseKwargs

parser = argparse.ArgumentParser()
parser.add_argument("--opt", default="sgd")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
parser.add_argument("--steps", type=int, default=4)
parser.add_argument("--resume", default="")
parser.add_argument("--output", required=True)
args = parser.parse_args()

distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
if distributed:
    dist.init_process_group("gloo")
rank = dist.get_rank() if distributed else 0
torch.manual_seed(0)
model = timm.create_model("test_resnet", num_classes=4, in_chans=1)
optimizer = create_optimizer_v2(model, opt=args.opt, lr=args.lr, momentum=0.9, **args.opt_kwargs)
if args.resume:
    checkpoint = torch.load(args.resume, weights_only=True)
    model.load_state_dict(checkpoint["state_dict"])
    optimizer.load_state_dict(checkpoint["optimizer"])
net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
g = torch.Generator().manual_seed(100 + rank)
for _ in range(args.steps):
    x, y = torch.randn(8, 1, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)
    optimizer.zero_grad()
    F.cross_entropy(net(x), y).backward()
    optimizer.step()
out = Path(args.output)
out.mkdir(parents=True, exist_ok=True)
if rank == 0:
    torch.save({"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "last.pth")
sp = getattr(optimizer, "sparsifier", None)
report = {"optimizer": type(optimizer).__name__, "rank": rank}
if sp is not None:
    from itop_timm.distributed import masks_fingerprint

    report |= {
        "density": sp.density,
        "itop_rate": sp.itop_rate,
        "step": sp.step,
        "update_interval": sp.config.update_interval,
        "fingerprint": masks_fingerprint(list(sp.masks.values())),
    }
(out / f"rank{rank}.json").write_text(json.dumps(report))
if distributed:
    dist.destroy_process_group()
