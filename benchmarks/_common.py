"""Shared helpers of the benchmark scripts: machine description, timing, result files."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

# ITOP_TIMM_BENCH_RESULTS redirects every result (the tests use it to keep the repository clean)
RESULTS = Path(os.environ.get("ITOP_TIMM_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def machine() -> dict[str, Any]:
    """CPU model, core count, thread count and library versions, for the record."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import timm

    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def timed(fn: Callable[[], Any], sync: bool = False) -> float:
    """Wall seconds of one call (CUDA-synchronised when ``sync``)."""
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if sync:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def latency(
    models: dict[str, torch.nn.Module], batch: int, reps: int, size: int, in_chans: int = 3
) -> dict[str, float]:
    """Median seconds per forward pass of each model on one ``(batch, in_chans, size, size)`` input, the
    models timed round-robin (so a change of machine load hits them alike), after 3 warm-up passes."""
    x = torch.randn(batch, in_chans, size, size)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            for _ in range(3):
                model(x)
        for _ in range(reps):
            for name, model in models.items():
                start = time.perf_counter()
                model(x)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def median(values: list[float]) -> float:
    return statistics.median(values)


def write_json(name: str, payload: dict[str, Any], out_dir: Path = RESULTS) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


#: how the accuracy tables and plots name each method
METHOD_LABELS = {
    "static": "Static",
    "set": "SET",
    "rigl": "RigL",
    "unfired": "RigL-ITOP (unfired)",
    "chase": "Chase (S_c 0.6, layer)",
    "srigl": "SRigL",
}

ROOT = Path(__file__).resolve().parents[1]
RUNS = RESULTS / "runs"


def fashion_mnist_config(
    output_dir: Path,
    *,
    epochs: int,
    train_samples: int | None,
    seed: int,
    method: str = "dense",
    density: float = 1.0,
    update_interval: int = 50,
    batch_size: int = 128,
    per_epoch_test: bool = False,
    eval_samples: int | None = None,
) -> dict[str, Any]:
    """The issue's Fashion-MNIST protocol: timm resnet18 (1 channel), SGD 0.1 / Nesterov 0.9 / wd 5e-4,
    lr x0.1 at 1/2 and 3/4, random-crop + flip augmentation, batch 128. Data: Debian's IDX files, or the
    folder in ``ITOP_TIMM_FASHION_MNIST_DIR``."""
    cfg: dict[str, Any] = {
        "model": {"name": "resnet18", "in_chans": 1, "img_size": 28},
        "data": {
            "dataset": "fashion_mnist",
            "data_dir": os.environ.get("ITOP_TIMM_FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"),
            "val_split": "test" if per_epoch_test else None,
            "val_fraction": 0.0,
            "test_split": "test",
            "max_train_samples": train_samples,
            "max_eval_samples": eval_samples,
            "batch_size": batch_size,
            "eval_batch_size": 500,
            "mean": [0.2860],
            "std": [0.3530],
            "crop": "pad",
            "crop_padding": 2,
        },
        "optim": {"opt": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
        "sched": {"name": "multistep", "milestones": [0.5, 0.75], "decay_rate": 0.1},
        "train": {"epochs": epochs, "seed": seed},
        "sparsity": {"method": method},
        "run": {
            "output_dir": str(output_dir),
            "log_interval": 25,
            "checkpoint_interval": 0,
            "keep_checkpoints": 1,
            "progress": False,
            "overwrite": True,
        },
    }
    if method != "dense":
        cfg["sparsity"] |= {
            "density": density,
            "distribution": "erk",
            "update_interval": update_interval,
            "prune_rate": 0.5,
            "prune_schedule": "cosine",
        }
    return cfg


def add_reuse_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--reuse-runs`` flag of the scripts that train through :func:`run_recipe`."""
    parser.add_argument(
        "--reuse-runs",
        action="store_true",
        help="reuse every finished run under benchmarks/results/runs/ whose saved config equals the one "
        "this invocation would train (resumes an interrupted benchmark)",
    )


def _config_text(cfg: dict[str, Any], processes: int) -> str:
    import yaml

    return yaml.safe_dump(cfg) + (f"# processes: {processes}\n" if processes > 1 else "")


def _without_output_dir(config_text: str) -> str:
    # The output folder is where the saved config lies, so a run read back from a clone at another path
    # (the full protocol's runs are committed) still matches.
    return re.sub(r"^  output_dir: .*$", "", config_text, flags=re.MULTILINE)


def finished_run(cfg: dict[str, Any], *, processes: int = 1) -> dict[str, Any] | None:
    """The summary (plus metrics log) of the finished run in ``cfg``'s output folder whose saved config
    (and process count) equals ``cfg``'s, or None when there is none."""
    out = Path(cfg["run"]["output_dir"])
    if not ((out / "summary.json").exists() and _same_config(out, cfg, processes)):
        return None
    return _read_run(out)


def _same_config(out: Path, cfg: dict[str, Any], processes: int) -> bool:
    """Whether the run folder ``out`` was trained with ``cfg`` (and ``processes``), wherever it now lies."""
    config_path = out / "bench_config.yaml"
    return config_path.exists() and _without_output_dir(config_path.read_text()) == _without_output_dir(
        _config_text(cfg, processes)
    )


def run_recipe(
    cfg: dict[str, Any], *, processes: int = 1, timeout: int = 7200, reuse: bool = False
) -> dict[str, Any]:
    """Run ``recipes/train.py`` on ``cfg`` in a fresh process (``accelerate launch`` for several) and
    return its summary plus the metrics log. With ``reuse``, the :func:`finished_run` in the same output
    folder is read back instead of trained again."""
    import subprocess
    import sys

    out = Path(cfg["run"]["output_dir"])
    if reuse and (summary := finished_run(cfg, processes=processes)) is not None:
        logging.getLogger(__name__).info("reusing the finished run in %s", out)
        return summary
    checkpoint = _interrupted_run_checkpoint(cfg, processes) if reuse else None
    if checkpoint is not None:
        logging.getLogger(__name__).info("continuing the interrupted run in %s from %s", out, checkpoint.name)
    else:
        out.mkdir(parents=True, exist_ok=True)
        for stale in ("summary.json", LAUNCHES_FILE, *(f.name for f in out.glob("bench_*.json"))):
            (out / stale).unlink(missing_ok=True)  # an earlier run's records (e.g. bench_latency.json)
        (out / "bench_config.yaml").write_text(_config_text(cfg, processes))
    _record_launch(out, checkpoint)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONPATH=str(ROOT))
    recipe = [
        str(ROOT / "recipes" / "train.py"),
        "--config",
        str(out / "bench_config.yaml"),
        "--log-level",
        "WARNING",
        *(["--run.resume", str(checkpoint)] if checkpoint is not None else []),
    ]
    if processes > 1:
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
            *recipe,
        ]
    else:
        cmd = [sys.executable, *recipe]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"run failed ({' '.join(cmd)}):\n{result.stderr[-4000:]}")
    return _read_run(out)


# One JSON line per launch of a benchmark run (the machine it trained on, and the checkpoint it continued
# from, if any): a run continued in another session may have trained on another machine, which its wall
# time then mixes.
LAUNCHES_FILE = "bench_launches.jsonl"


def _interrupted_run_checkpoint(cfg: dict[str, Any], processes: int) -> Path | None:
    """The latest checkpoint of an unfinished run in ``cfg``'s output folder whose saved config (and
    process count) equals ``cfg``'s, or None: ``--reuse-runs`` continues it instead of starting over."""
    from itop_timm.training.checkpointing import checkpoint_dir, latest_checkpoint

    out = Path(cfg["run"]["output_dir"])
    if (out / "summary.json").exists() or not _same_config(out, cfg, processes):
        return None
    return latest_checkpoint(checkpoint_dir(out))


def _record_launch(out: Path, checkpoint: Path | None) -> None:
    record = {"cpu": machine()["cpu"], "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    record["resumed_from"] = checkpoint.name if checkpoint is not None else None
    with open(out / LAUNCHES_FILE, "a") as f:
        f.write(json.dumps(record) + "\n")


def _read_run(out: Path) -> dict[str, Any]:
    summary = json.loads((out / "summary.json").read_text())
    summary["metrics"] = [
        json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line
    ]
    launches = out / LAUNCHES_FILE  # absent in runs finished before it was recorded
    if launches.exists():
        summary["launches"] = [json.loads(line) for line in launches.read_text().splitlines() if line]
    return summary


def mean_std(values: list[float]) -> tuple[float, float]:
    if len(values) == 1:
        return values[0], 0.0
    return statistics.mean(values), statistics.stdev(values)


# Student's t, two-sided 5 %: the 0.975 quantile for 1..10 degrees of freedom (beyond 10: the normal's).
_T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def welch_gap(sample: list[float], reference: list[float]) -> dict[str, Any]:
    """Whether ``mean(sample) - mean(reference)`` is beyond seed noise: Welch's two-sided t-test at 5 %.

    Returns the ``gap``, its standard error ``se`` (sqrt(s_a²/n_a + s_b²/n_b)), the statistic ``t``, the
    Welch-Satterthwaite degrees of freedom ``df`` and ``beyond_noise`` (|t| above Student's 0.975 quantile
    at ``floor(df)`` degrees of freedom: rounding down is the conservative side). With fewer than 2 values on
    either side nothing can be said: ``se``, ``t`` and ``df`` are None and ``beyond_noise`` is None."""
    gap = statistics.mean(sample) - statistics.mean(reference)
    if len(sample) < 2 or len(reference) < 2:
        return {"gap": gap, "se": None, "t": None, "df": None, "beyond_noise": None}
    va, vb = statistics.variance(sample) / len(sample), statistics.variance(reference) / len(reference)
    se = (va + vb) ** 0.5
    if se == 0.0:
        return {"gap": gap, "se": 0.0, "t": None, "df": None, "beyond_noise": gap != 0.0}
    df = (va + vb) ** 2 / (va**2 / (len(sample) - 1) + vb**2 / (len(reference) - 1))
    t = gap / se
    return {"gap": gap, "se": se, "t": t, "df": df, "beyond_noise": _beyond_5_percent(t, df)}


def paired_gap(sample: dict[int, float], reference: dict[int, float]) -> dict[str, Any]:
    """Whether ``sample`` and ``reference``, keyed by seed, differ beyond seed noise when each seed is
    compared with itself: the paired two-sided t-test at 5 % on the differences over the seeds both have.

    The right test where a seed fixes what the two runs share (initial weights, initial mask, data
    order): a seed that is good or bad for both cancels out. Returns ``seeds`` (how many are paired), the
    mean difference ``gap``, its standard error ``se`` (std of the differences / sqrt(n)), ``t``, ``df``
    (n - 1) and ``beyond_noise``; with fewer than 2 shared seeds ``se``, ``t``, ``df`` and
    ``beyond_noise`` are None."""
    differences = [sample[s] - reference[s] for s in sorted(sample.keys() & reference.keys())]
    n = len(differences)
    gap = statistics.mean(differences) if n else None
    se = statistics.stdev(differences) / n**0.5 if n >= 2 else None
    t, df = (gap / se, n - 1) if se else (None, None)  # se 0: every seed differs alike, no t
    beyond_noise = None if se is None else (gap != 0.0) if t is None else _beyond_5_percent(t, df)
    return {"seeds": n, "gap": gap, "se": se, "t": t, "df": df, "beyond_noise": beyond_noise}


def _beyond_5_percent(t: float, df: float) -> bool:
    """|t| above Student's two-sided 5 % critical value at ``floor(df)`` degrees of freedom."""
    critical = _T_975[int(df) - 1] if int(df) <= len(_T_975) else 1.96
    return abs(t) > critical


def aggregate_seeds(rows: list[dict[str, Any]], key: str = "model") -> list[dict[str, Any]]:
    """Per configuration (``row[key]``, in first-seen order): ``seeds`` and the mean and ``<column>_std``
    of every numeric column over its rows (booleans and ``seed`` left out)."""
    out = []
    for name in dict.fromkeys(r[key] for r in rows):
        runs = [r for r in rows if r[key] == name]
        agg: dict[str, Any] = {key: name, "seeds": [r.get("seed") for r in runs]}
        for column, value in runs[0].items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and column != "seed":
                agg[column], agg[column + "_std"] = mean_std([float(r[column]) for r in runs])
        out.append(agg)
    return out
