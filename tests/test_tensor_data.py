"""The in-memory data path (exact seeding, what the augmentation does, resume) and the thread/worker
settings (resolution and bad input)."""

from __future__ import annotations

import pytest
import torch
from accelerate.data_loader import skip_first_batches

from itop_timm.training.config import TrainConfig
from itop_timm.training.data import EpochShuffleSampler
from itop_timm.training.resources import (
    ThreadPlan,
    resolve_num_threads,
    resolve_num_workers,
    usable_cores,
)
from itop_timm.training.tensor_data import (
    BatchAugment,
    TensorImageDataset,
    device_batches,
    make_tensor_loader,
    sample_keys,
)

MEAN, STD = (0.5, 0.25, 0.1), (0.2, 0.3, 0.4)


def images(n: int = 64, size: int = 8) -> torch.Tensor:
    return torch.randint(
        0, 256, (n, 3, size, size), generator=torch.Generator().manual_seed(1), dtype=torch.uint8
    )


def normalized(x: torch.Tensor) -> torch.Tensor:
    mean, std = torch.tensor(MEAN).view(-1, 1, 1), torch.tensor(STD).view(-1, 1, 1)
    return (x.float() / 255.0 - mean) / std


# ------------------------------------------------------------------------------- seeding
def test_sample_keys_are_a_function_of_seed_epoch_draw_and_index():
    idx = torch.arange(1000)
    keys = sample_keys(3, 1, 1, idx)
    assert torch.equal(keys, sample_keys(3, 1, 1, idx))
    assert torch.equal(keys[[7, 2]], sample_keys(3, 1, 1, torch.tensor([7, 2])))  # batch-independent
    for other in (sample_keys(4, 1, 1, idx), sample_keys(3, 2, 1, idx), sample_keys(3, 1, 2, idx)):
        assert (other != keys).float().mean() > 0.99
    assert keys.min() >= 0 and keys.max() < 2**31
    assert len(set((keys % 5).tolist())) == 5 and abs(float((keys % 2).float().mean()) - 0.5) < 0.06


def test_a_sample_gets_the_same_image_in_any_batch():
    x, aug = images(), BatchAugment(MEAN, STD, seed=0, padding=2, hflip=0.5)
    a = aug(x[[3, 5, 9]], torch.tensor([3, 5, 9]), epoch=4)
    b = aug(x[[9, 3]], torch.tensor([9, 3]), epoch=4)  # another rank's / batch's view of samples 9 and 3
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(a, aug(x[[3, 5, 9]], torch.tensor([3, 5, 9]), epoch=5))


# ------------------------------------------------------------------------- augmentation
def test_crop_is_a_shifted_window_of_the_padded_image_and_flip_mirrors_it():
    x, pad = images(), 2
    aug = BatchAugment(MEAN, STD, seed=7, padding=pad, hflip=0.5)
    idx = torch.arange(len(x))
    out = aug(x, idx, epoch=1)
    dy, dx, flip = aug.windows(idx, 1, 8, 8)
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
    for i in range(len(x)):
        window = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        expected = window.flip(-1) if flip[i] else window
        assert torch.allclose(out[i], normalized(expected), atol=1e-6)
    assert 0 < int(flip.sum()) < len(x)  # both flipped and unflipped samples
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(2 * pad + 1))  # every shift occurs


def test_no_padding_no_flip_is_normalisation_only():
    x = images()
    out = BatchAugment(MEAN, STD, seed=0)(x, torch.arange(len(x)), epoch=0)
    assert torch.allclose(out, normalized(x), atol=1e-6)
    never = BatchAugment(MEAN, STD, seed=0, padding=0, hflip=0.0)
    always = BatchAugment(MEAN, STD, seed=0, padding=0, hflip=1.0)
    assert torch.allclose(always(x, torch.arange(len(x)), 0), normalized(x.flip(-1)), atol=1e-6)
    assert torch.equal(never(x, torch.arange(len(x)), 0), out)


# ------------------------------------------------------------------------------- loaders
def epoch_batches(dataset: TensorImageDataset, epoch: int, skip: int = 0) -> list[torch.Tensor]:
    loader = make_tensor_loader(
        dataset, 8, sampler=EpochShuffleSampler(len(dataset), 5), train=True, seed=5, num_workers=0
    )
    loader.sampler.set_epoch(epoch)
    if skip:
        loader = skip_first_batches(loader, skip)
    return [x for x, _ in device_batches(loader, dataset, epoch)]


def test_same_seed_epoch_and_step_give_the_same_batch_and_resume_matches():
    x = images(60)
    dataset = TensorImageDataset(
        x, torch.arange(60) % 10, BatchAugment(MEAN, STD, seed=5, padding=2, hflip=0.5), train=True
    )
    first, again = epoch_batches(dataset, 0), epoch_batches(dataset, 0)
    assert len(first) == 7 and all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    resumed = epoch_batches(dataset, 0, skip=3)  # a run resumed after 3 batches of the epoch
    assert all(torch.equal(a, b) for a, b in zip(first[3:], resumed, strict=True)) and len(resumed) == 4
    assert not torch.equal(first[0], epoch_batches(dataset, 1)[0])


def test_evaluation_batches_are_normalised_floats():
    x = images(10)
    dataset = TensorImageDataset(
        x, torch.arange(10), BatchAugment(MEAN, STD, seed=0, padding=2, hflip=1.0), train=False
    )
    loader = make_tensor_loader(dataset, 4, sampler=None, train=False, seed=0, num_workers=0)
    got = torch.cat([b for b, _ in loader])
    assert torch.allclose(got, normalized(x), atol=1e-6)


# --------------------------------------------------------------------- threads / workers
def test_num_threads_resolution():
    cores = usable_cores()
    assert resolve_num_threads(1, {}).threads == 1
    assert resolve_num_threads("auto", {}) == ThreadPlan(cores, "auto", cores, 1)
    assert resolve_num_threads("auto", {"OMP_NUM_THREADS": "1"}).source == "OMP_NUM_THREADS"
    # accelerate launch exports OMP_NUM_THREADS=1 itself: not the user's choice
    launched = {"OMP_NUM_THREADS": "1", "ACCELERATE_DYNAMO_BACKEND": "NO", "LOCAL_WORLD_SIZE": "1"}
    assert resolve_num_threads("auto", launched).threads == cores
    two = resolve_num_threads("auto", launched | {"LOCAL_WORLD_SIZE": "2"})
    assert two.threads == max(1, cores // 2) and two.local_processes == 2


def test_num_workers_resolution():
    plan = ThreadPlan(threads=2, source="auto", usable_cores=8, local_processes=2)
    assert resolve_num_workers(3, plan, "cpu") == 3
    assert resolve_num_workers("auto", plan, "cpu") == 2  # 4 cores per process, 2 compute
    assert resolve_num_workers("auto", plan, "cuda") == 3  # all of the share but the main process
    assert resolve_num_workers("auto", ThreadPlan(4, "auto", 4, 1), "cpu") == 0


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("run", "num_threads", 0, r"run.num_threads must be 'auto' or an integer in \[1, \d+\].*got 0"),
        ("run", "num_threads", 10**6, r"run.num_threads .*\[1, \d+\].*got 1000000"),
        ("run", "num_threads", "many", r"run.num_threads .*got 'many'"),
        ("data", "num_workers", -1, r"data.num_workers must be 'auto' or an integer >= 0, got -1"),
        ("data", "num_workers", "lots", r"data.num_workers .*got 'lots'"),
    ],
)
def test_bad_threads_and_workers_are_refused_with_the_allowed_range(tmp_path, section, key, value, message):
    out = tmp_path / "run"
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(
            {section: {key: value}, "run": {"output_dir": str(out)}}
            if section != "run"
            else {"run": {key: value, "output_dir": str(out)}}
        )
    assert not out.exists()


def test_in_memory_needs_a_tensor_augmentation():
    with pytest.raises(ValueError, match="data.in_memory=true is not possible with data.crop='rrc'"):
        TrainConfig.from_dict({"data": {"in_memory": True, "crop": "rrc"}})
