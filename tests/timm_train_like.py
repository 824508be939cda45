"""A stand-in for timm's train.py (which is not vendored), in its order and with its calls, looked up as
it looks them up: ``utils.setup_default_logging()``; the training loader from
``timm.data.create_loader(..., is_training=True)``, then the optimizer from
``create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)`` with ``--opt-kwargs``
parsed by timm's ``ParseKwargs``; ``--resume``; ``create_scheduler_v2(optimizer,
**scheduler_kwargs(args), updates_per_epoch=...)`` for the epoch count; ``Train:`` lines on the
``train`` logger every ``--log-interval`` updates (rank 0); per epoch ``utils.update_summary(...,
filename=<output>/summary.csv)`` then the checkpoint (``torch.save`` of ``optimizer.state_dict()``,
``last.pth``). It never imports itop_timm. Under torchrun it trains DDP over gloo. ``--steps N`` stops
after N optimizer steps (an interrupted run). Writes ``<output>/rank<r>.json``."""

import argparse
import json
import logging
import os
from collections import OrderedDict
from pathlib import Path

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F
from timm import utils
from timm.data import create_loader
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2, scheduler_kwargs
from timm.utils import ParseKwargs

_logger = logging.getLogger("train")

parser = argparse.ArgumentParser()
parser.add_argument("--in-chans", type=int, default=1)
parser.add_argument("--opt", default="sgd")
parser.add_argument("--lr", type=float, default=0.05)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--weight-decay", type=float, default=0.0)
parser.add_argument("--opt-kwargs", nargs="*", default={}, action=ParseKwargs)
parser.add_argument("--sched", default="cosine")
parser.add_argument("--epochs", type=int, default=2)
parser.add_argument("--warmup-epochs", type=int, default=0)
parser.add_argument("--warmup-prefix", action="store_true", default=False)
parser.add_argument("--cooldown-epochs", type=int, default=0)
parser.add_argument("--grad-accum-steps", type=int, default=1)
parser.add_argument("-b", "--batch-size", type=int, default=8)
parser.add_argument("--samples", type=int, default=16, help="training images (all ranks together)")
parser.add_argument("--log-interval", type=int, default=1)
parser.add_argument("--steps", type=int, default=0, help="stop after this many optimizer steps (0: all)")
parser.add_argument("--resume", default="")
parser.add_argument("--output", required=True)


class Images(torch.utils.data.Dataset):
    """Fixed random 1x16x16 images of 4 classes (timm's loader sets ``transform``; it is not used)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(1)
        self.x, self.y = torch.randn(n, 1, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)
        self.transform = None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int):
        return self.x[i], int(self.y[i])


def main() -> None:
    utils.setup_default_logging()
    args = parser.parse_args()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4, in_chans=args.in_chans)
    data = Images(args.samples)
    loader_train = create_loader(
        data,
        input_size=(args.in_chans, 16, 16),
        batch_size=args.batch_size,
        is_training=True,
        use_prefetcher=False,
        num_workers=0,
        persistent_workers=False,
        distributed=distributed,
    )
    optimizer = create_optimizer_v2(model, **optimizer_kwargs(cfg=args), **args.opt_kwargs)
    if args.resume:
        checkpoint = torch.load(args.resume, weights_only=True)
        model.load_state_dict(checkpoint["state_dict"])
        optimizer.load_state_dict(checkpoint["optimizer"])
    net = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    updates_per_epoch = (len(loader_train) + args.grad_accum_steps - 1) // args.grad_accum_steps
    lr_scheduler, num_epochs = create_scheduler_v2(
        optimizer, **scheduler_kwargs(args), updates_per_epoch=updates_per_epoch
    )
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    steps = 0
    for epoch in range(num_epochs):
        if distributed:
            loader_train.sampler.set_epoch(epoch)
        losses = []
        for batch_idx, (x, y) in enumerate(loader_train):
            optimizer.zero_grad()
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            optimizer.step()
            steps += 1
            losses.append(loss.item())
            if rank == 0 and (batch_idx % args.log_interval == 0 or batch_idx == len(loader_train) - 1):
                lr = optimizer.param_groups[0]["lr"]
                _logger.info(
                    f"Train: {epoch} [{batch_idx:>4d}/{updates_per_epoch}]  Loss: {losses[-1]:#.3g}  LR: {lr:.3e}"
                )
            lr_scheduler.step_update(num_updates=epoch * updates_per_epoch + batch_idx + 1)
            if steps == args.steps:
                break
        with torch.no_grad():
            model.eval()
            logits = model(data.x)
            model.train()
        top = logits.topk(2, dim=1).indices
        eval_metrics = OrderedDict(
            loss=float(F.cross_entropy(logits, data.y)),
            top1=100.0 * float((top[:, 0] == data.y).float().mean()),
            top5=100.0 * float((top == data.y[:, None]).any(dim=1).float().mean()),
        )
        if rank == 0:
            utils.update_summary(
                epoch,
                OrderedDict(loss=sum(losses) / len(losses)),
                eval_metrics,
                filename=os.path.join(out, "summary.csv"),
                lr=optimizer.param_groups[0]["lr"],
                write_header=epoch == 0,
            )
            torch.save(
                {"state_dict": model.state_dict(), "optimizer": optimizer.state_dict()}, out / "last.pth"
            )
        lr_scheduler.step(epoch + 1)
        if steps == args.steps:
            break
    sp = getattr(optimizer, "sparsifier", None)
    report = {"optimizer": type(optimizer).__name__, "rank": rank}
    if sp is not None:
        from itop_timm.distributed import masks_fingerprint

        report |= {
            "density": sp.density,
            "itop_rate": sp.itop_rate,
            "step": sp.step,
            "total_steps": sp.config.total_steps,
            "update_interval": sp.config.update_interval,
            "fingerprint": masks_fingerprint(list(sp.masks.values())),
        }
    (out / f"rank{rank}.json").write_text(json.dumps(report))
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
