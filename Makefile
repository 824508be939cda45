# Benchmarks (CPU). Results: benchmarks/results/*.json + *.png; tables: BENCHMARKS.md.
# `make bench` takes about 70 minutes on 2 cores; `make bench-full` is the protocol behind BENCHMARKS.md
# (hours); `make bench-quick` is a smoke run of every script (minutes).
PY := python3 -m uv run --locked python

.PHONY: bench bench-quick bench-full bench-protocol bench-cifar10 test

test:
	python3 -m uv run --locked pytest

bench:
	$(PY) benchmarks/step_overhead.py --models resnet18 vit_tiny_patch16_224 resnet50 vit_small_patch16_224 --memory
	$(PY) benchmarks/checkpoint_sizes.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/accuracy_vs_density.py --train-samples 2000 --eval-samples 5000 --update-interval 10

bench-full: bench
	$(PY) benchmarks/accuracy_vs_density.py --train-samples 10000 --update-interval 25
	$(PY) benchmarks/sparse_compute.py --reuse-runs
	$(PY) benchmarks/averaging.py
	$(PY) benchmarks/structured.py
	$(PY) benchmarks/condense.py

# BENCHMARKS §1: the full accuracy protocol (27 runs of ~10 min on 2 cores); continues where it stopped.
bench-protocol:
	$(PY) benchmarks/accuracy_vs_density.py --train-samples 0 --densities 0.1 0.02 --update-interval 100 --reuse-runs

# BENCHMARKS §9: the CIFAR-10 protocol (33 runs, ~18 core-hours), one copy per core, each run on one thread;
# continues where it stopped (an interrupted run from its latest checkpoint). Data: ../shared/data/cifar10
# or ITOP_TIMM_CIFAR10_DIR.
bench-cifar10:
	taskset -c 0 $(PY) benchmarks/accuracy_vs_density.py --dataset cifar10 --reuse-runs --shard 0/2 & \
	taskset -c 1 $(PY) benchmarks/accuracy_vs_density.py --dataset cifar10 --reuse-runs --shard 1/2; wait
	$(PY) benchmarks/accuracy_vs_density.py --dataset cifar10 --summarize
	$(PY) benchmarks/report.py

bench-quick:
	$(PY) benchmarks/step_overhead.py --quick --models resnet18 --memory
	$(PY) benchmarks/checkpoint_sizes.py --quick
	$(PY) benchmarks/scaling.py --quick
	$(PY) benchmarks/accuracy_vs_density.py --quick
	$(PY) benchmarks/accuracy_vs_density.py --dataset cifar10 --quick
	$(PY) benchmarks/averaging.py --quick
	$(PY) benchmarks/structured.py --quick
	$(PY) benchmarks/condense.py --quick
	$(PY) benchmarks/sparse_compute.py --quick
