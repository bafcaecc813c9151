# cspine — every pipeline step is a target. `make help` lists them with inputs and outputs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PRESET ?= demo
DATA ?= data/synth_$(PRESET)
WORK ?= work/$(PRESET)
JOBS ?= 2
export WANDB_MODE ?= offline

.PHONY: help install test test-all synth check-data lint

help:  ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --upgrade pip
	$(VENV)/bin/pip install "$(TORCH)"
	$(VENV)/bin/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed  ## create .venv: torch ($(TORCH)) first, then cspine with dev extras

test: install  ## run the test suite (slow tests included; skip them with PYTEST_ARGS='-m "not slow"')
	WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

synth: install  ## write the synthetic dataset: PRESET=tiny|demo|full -> DATA (resumes; refuses a DATA written with other options)
	$(VENV)/bin/cspine synth $(DATA) --preset $(PRESET)

.PHONY: synth-figure
synth-figure: synth  ## README figure of one synthetic study (sagittal + axial, aligned mask, crack box): DATA -> docs/images/synth_example.png
	$(PY) -m common.synth.figure $(DATA) docs/images/synth_example.png

check-data: install  ## census and validation of DATA -> WORK/qc_data.csv
	$(VENV)/bin/cspine check-data $(DATA) --out $(WORK)/qc_data.csv

.PHONY: bench-load
bench-load: install  ## DICOM loading benchmark: synthetic 300-slice 512² series (cached in work/bench/, raw + JPEG-LL) -> benchmarks/results/load_series.md; also peak RSS of a 1,082-slice load
	$(PY) benchmarks/load_series.py
	$(PY) benchmarks/load_series.py --rss

.PHONY: folds
folds: install  ## stratified CV folds of DATA/train.csv -> WORK/folds.csv (made once, then reused)
	$(VENV)/bin/cspine folds $(DATA) --out $(WORK)/folds.csv

# ---------------------------------------------------------------- stage 1 (stage1_segment)
STAGE1_CONFIG ?= configs/stage1/cpu.yaml
STAGE1_CKPT ?= best
STAGE1_ARGS ?=
S1 := --data.data_root $(DATA) --data.work_dir $(WORK)
.PHONY: stage1-prepare stage1-fit stage1-predict crops
stage1-prepare: install  ## stage-1 cache (STAGE1_CONFIG data: grid): DATA DICOM + segmentations -> WORK/stage1/cache/<key>/<UID>.npz, WORK/stage1/qc_prepare.csv; cached studies are skipped
	$(PY) -m stage1_segment.prepare -c $(STAGE1_CONFIG) --data-root $(DATA) --work-dir $(WORK) --jobs $(JOBS)

stage1-fit: install  ## train the segmenter (STAGE1_CONFIG) on WORK/stage1/cache + WORK/folds.csv -> WORK/stage1/checkpoints/{best,last}.ckpt, WORK/stage1/run.json, WORK/stage1/wandb; skipped when run.json exists, resumed from last.ckpt
	@if [ -f $(WORK)/stage1/run.json ]; then echo "stage 1 fit: done ($(WORK)/stage1/run.json; delete it to retrain)"; exit 0; fi; \
	resume=""; if [ -f $(WORK)/stage1/checkpoints/last.ckpt ]; then resume="--ckpt_path last"; echo "stage 1 fit: resuming"; fi; \
	$(PY) -m stage1_segment fit -c $(STAGE1_CONFIG) $(S1) --data.prepare_jobs $(JOBS) $$resume $(STAGE1_ARGS)

stage1-predict: install  ## masks + boxes for every train/test study with STAGE1_CKPT (best|last|path) -> WORK/stage1/predict/{masks/<UID>.nii.gz,boxes/<UID>.json,boxes.csv,qc_predict.csv}
	$(PY) -m stage1_segment predict -c $(STAGE1_CONFIG) $(S1) --data.prepare_jobs $(JOBS) --ckpt_path $(STAGE1_CKPT) --trainer.logger false $(STAGE1_ARGS)

crops: install  ## per-vertebra crops (STAGE1_CONFIG crops:) from DATA + WORK/stage1/predict -> WORK/stage1/crops/<UID>_<C#>.npz + vertebrae.csv (the stage-2 manifest) + run.json
	$(PY) -m stage1_segment.crops -c $(STAGE1_CONFIG) --data-root $(DATA) --work-dir $(WORK) --jobs $(JOBS)

# ---------------------------------------------------------------- stage 2 (stage2_classify)
STAGE2_CONFIG ?= configs/stage2/cpu.yaml
STAGE2_FOLDS ?= 0 1 2 3 4
STAGE2_ARGS ?=
AGG_RULE ?= stacker
CLIP ?= 0.001 0.999
.PHONY: stage2-fit evaluate submit
stage2-fit: install  ## train stage 2 (FOLD=k, else every fold in turn; STAGE2_CONFIG) on WORK/stage1/crops/vertebrae.csv + DATA/train.csv + WORK/folds.csv -> WORK/stage2/fold<k>/ (checkpoints, run.json, wandb), WORK/stage2/oof/fold<k>.csv; a finished fold is skipped, an interrupted one resumes from last.ckpt
	@for k in $(if $(FOLD),$(FOLD),$(STAGE2_FOLDS)); do \
	  dir=$(WORK)/stage2/fold$$k; \
	  if [ -f $$dir/run.json ]; then echo "stage 2 fold $$k: done ($$dir/run.json; delete $$dir to retrain)"; continue; fi; \
	  resume=""; if [ -f $$dir/checkpoints/last.ckpt ]; then resume="--ckpt_path last"; echo "stage 2 fold $$k: resuming"; fi; \
	  $(PY) -m stage2_classify fit -c $(STAGE2_CONFIG) --data.fold $$k \
	    --data.manifest $(WORK)/stage1/crops/vertebrae.csv --data.data_root $(DATA) \
	    --data.folds_csv $(WORK)/folds.csv --trainer.default_root_dir $$dir \
	    --trainer.logger.init_args.save_dir $$dir --trainer.logger.init_args.name stage2-fold$$k \
	    --oof_dir $(WORK)/stage2/oof $$resume $(STAGE2_ARGS) || exit 1; \
	done

evaluate: install  ## stage-2 OOF evaluation: WORK/stage2/oof/fold*.csv + DATA/train.csv -> WORK/oof.csv, WORK/metrics.json, WORK/report/{roc,calibration}.png, WORK/stage2/stacker.json (AGG_RULE, CLIP)
	$(PY) -m stage2_classify.evaluate --work $(WORK) --data $(DATA) --rule $(AGG_RULE) --clip $(CLIP)

submit: install  ## score test crops with every fold model: WORK/stage1/crops/vertebrae.csv + WORK/stage2/ + DATA/sample_submission.csv -> WORK/submission.csv, WORK/stage2/submit_qc.csv
	$(PY) -m stage2_classify.submit --work $(WORK) --data $(DATA) --rule $(AGG_RULE) --clip $(CLIP)

# ---------------------------------------------------------------- end to end (demo, smoke, report)
# The chain run by `make demo` and `make smoke`, in order; each step skips finished work.
PIPELINE_STEPS := synth check-data folds stage1-prepare stage1-fit stage1-predict crops stage2-fit evaluate submit report
SMOKE_DATA := $(if $(filter command line environment,$(origin DATA)),$(DATA),data/synth_tiny)
SMOKE_WORK := $(if $(filter command line environment,$(origin WORK)),$(WORK),work/smoke)
SMOKE_FOLDS ?= 0 1
.PHONY: demo smoke report summary
demo: install  ## the whole pipeline on PRESET=demo (synth -> stage 1 -> stage 2 -> submit -> report -> summary): DATA -> WORK/{submission.csv,oof.csv,metrics.json,report/,stage1/,stage2/}; cached steps are skipped
	@start=$$(date +%s); \
	for step in $(PIPELINE_STEPS); do \
	  echo "==> make $$step  (DATA=$(DATA) WORK=$(WORK))"; \
	  $(MAKE) --no-print-directory $$step PRESET=$(PRESET) DATA=$(DATA) WORK=$(WORK) || exit 1; \
	done; \
	$(VENV)/bin/cspine summary $(WORK) --data $(DATA) --seconds $$(( $$(date +%s) - start ))

smoke: install  ## the demo chain on PRESET=tiny with configs/smoke/* (a few steps, folds SMOKE_FOLDS) for CI: DATA (default data/synth_tiny) -> WORK (default work/smoke)
	@$(MAKE) --no-print-directory demo PRESET=tiny DATA=$(SMOKE_DATA) WORK=$(SMOKE_WORK) \
	  STAGE1_CONFIG="configs/stage1/cpu.yaml -c configs/smoke/stage1.yaml" \
	  STAGE2_CONFIG="configs/stage2/cpu.yaml -c configs/smoke/pipeline_stage2.yaml" \
	  STAGE2_FOLDS="$(SMOKE_FOLDS)"

report: install  ## HTML report of a run: WORK/{qc_data.csv,stage1/,metrics.json,report/*.png,stage2/submit_qc.csv} -> WORK/report/index.html (+ PNGs)
	$(VENV)/bin/cspine report $(WORK) --data $(DATA)

summary: install  ## print the short run summary (stage-1 Dice, metric vs baseline, AUC, output paths) of WORK
	$(VENV)/bin/cspine summary $(WORK) --data $(DATA)
