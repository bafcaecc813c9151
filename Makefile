# cspine — every pipeline step is a target. `make help` lists them with inputs and outputs.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
# e.g. https://download.pytorch.org/whl/cu126 for a CUDA build of $(TORCH); empty: the default index
TORCH_INDEX ?=
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
	$(VENV)/bin/pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
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

# Training targets skip a finished run only when its inputs are unchanged: the fingerprint
# (sha256 of the config files, the inputs' tables and the extra args) is written next to the run.
# A finished run with another fingerprint is moved aside to <dir>.stale/ (the previous .stale is
# replaced) and trained again; a run without run.json resumes from last.ckpt.
# $(call keep_or_retire,DIR,LABEL,PATHS,SKIP): expects $$fp in the shell; runs SKIP (e.g. exit 0)
# when the finished run is kept, moves PATHS aside when it is stale.
define keep_or_retire
if [ -f $(1)/run.json ] || [ -f $(1)/fit.fingerprint ]; then \
	  if [ "$$(cat $(1)/fit.fingerprint 2>/dev/null)" = "$$fp" ]; then \
	    if [ -f $(1)/run.json ]; then echo "$(2): done, inputs unchanged ($(1)/run.json; delete it to retrain)"; $(4); fi; \
	  else \
	    echo "$(2): config or inputs changed since the last run; moving it to $(1).stale/ and training again"; \
	    rm -rf $(1).stale && mkdir -p $(1).stale && for p in $(3); do [ -e $$p ] && mv $$p $(1).stale/ || true; done; \
	  fi; \
	fi
endef

# ---------------------------------------------------------------- stage 1 (stage1_segment)
STAGE1_CONFIG ?= configs/stage1/cpu.yaml
STAGE1_CKPT ?= best
STAGE1_ARGS ?=
S1 := --data.data_root $(DATA) --data.work_dir $(WORK)
.PHONY: stage1-prepare stage1-fit crops
stage1-prepare: install  ## stage-1 training cache (STAGE1_CONFIG data: grid) of the segmented train studies: DATA DICOM + segmentations -> WORK/stage1/cache/<key>/<UID>.npz (model grid), WORK/cache/volumes/<UID>.npz (decoded once, read by crops), WORK/stage1/qc_prepare.csv; cached studies are skipped
	$(PY) -m stage1_segment.prepare -c $(STAGE1_CONFIG) --data-root $(DATA) --work-dir $(WORK) --jobs $(JOBS)

stage1-fit: install  ## train the segmenter (STAGE1_CONFIG) on WORK/stage1/cache + WORK/folds.csv -> WORK/stage1/checkpoints/{best,last}.ckpt, WORK/stage1/run.json, WORK/stage1/wandb; skipped when finished with unchanged config and inputs (else the old run moves to WORK/stage1.stale/), resumed from last.ckpt
	@fp=$$({ awk '/^[^ \t#]/{skip=($$1=="crops:")} !skip' $(filter-out -c,$(STAGE1_CONFIG)); cat $(WORK)/folds.csv; } | { cat; echo "$(STAGE1_ARGS)"; } | sha256sum | cut -c1-16); \
	$(call keep_or_retire,$(WORK)/stage1,stage 1 fit,$(WORK)/stage1/checkpoints $(WORK)/stage1/run.json $(WORK)/stage1/wandb,exit 0); \
	resume=""; if [ -f $(WORK)/stage1/checkpoints/last.ckpt ]; then resume="--ckpt_path last"; echo "stage 1 fit: resuming"; fi; \
	mkdir -p $(WORK)/stage1 && echo $$fp > $(WORK)/stage1/fit.fingerprint && \
	$(PY) -m stage1_segment fit -c $(STAGE1_CONFIG) $(S1) --data.prepare_jobs $(JOBS) $$resume $(STAGE1_ARGS)

crops: install  ## stage-1 part of the test-time engine over the train studies with STAGE1_CKPT (best|last|path), crop settings from STAGE1_CONFIG crops: -> WORK/stage1/crops/<UID>_<C#>.npz + vertebrae.csv (the stage-2 manifest) + qc_crops.csv, WORK/stage1/masks/<UID>.nii.gz; SHARD=i/N for one share
	$(VENV)/bin/cspine crops $(DATA) --work $(WORK) -c $(STAGE1_CONFIG) --stage1-ckpt $(STAGE1_CKPT) --jobs $(JOBS) $(if $(SHARD),--shard $(SHARD))

# ---------------------------------------------------------------- stage 2 (stage2_classify)
STAGE2_CONFIG ?= configs/stage2/cpu.yaml
STAGE2_FOLDS ?= 0 1 2 3 4
STAGE2_ARGS ?=
# empty: evaluate uses its defaults (rule max, clip 0.001 0.999) and records them in
# WORK/metrics.json; submit and `cspine predict` then use what evaluate recorded
AGG_RULE ?=
CLIP ?=
SHARD ?=
# what submit does when the evaluated rule does not beat the constant prior: refuse|go-on|prior
IF_WORSE ?=
DICOM ?=
.PHONY: stage2-fit evaluate submit
stage2-fit: install  ## train stage 2 (FOLD=k, else every fold in turn; STAGE2_CONFIG) on WORK/stage1/crops/vertebrae.csv + DATA/train.csv + WORK/folds.csv -> WORK/stage2/fold<k>/ (checkpoints, run.json, wandb), WORK/stage2/oof/fold<k>.csv; a finished fold with unchanged config and inputs is skipped (a stale one moves to fold<k>.stale/), an interrupted one resumes from last.ckpt
	@for k in $(if $(FOLD),$(FOLD),$(STAGE2_FOLDS)); do \
	  dir=$(WORK)/stage2/fold$$k; \
	  fp=$$(cat $(filter-out -c,$(STAGE2_CONFIG)) $(WORK)/stage1/crops/vertebrae.csv $(WORK)/folds.csv | { cat; echo "$$k $(STAGE2_ARGS)"; } | sha256sum | cut -c1-16); \
	  $(call keep_or_retire,$$dir,stage 2 fold $$k,$$dir $(WORK)/stage2/oof/fold$$k.csv,false) || continue; \
	  resume=""; if [ -f $$dir/checkpoints/last.ckpt ]; then resume="--ckpt_path last"; echo "stage 2 fold $$k: resuming"; fi; \
	  mkdir -p $$dir && echo $$fp > $$dir/fit.fingerprint && \
	  $(PY) -m stage2_classify fit -c $(STAGE2_CONFIG) --data.fold $$k \
	    --data.manifest $(WORK)/stage1/crops/vertebrae.csv --data.data_root $(DATA) \
	    --data.folds_csv $(WORK)/folds.csv --trainer.default_root_dir $$dir \
	    --trainer.logger.init_args.save_dir $$dir --trainer.logger.init_args.name stage2-fold$$k \
	    --oof_dir $(WORK)/stage2/oof $$resume $(STAGE2_ARGS) || exit 1; \
	done

evaluate: install  ## stage-2 OOF evaluation: WORK/stage2/oof/fold*.csv + DATA/train.csv -> WORK/oof.csv, WORK/metrics.json (records the rule and clip), WORK/report/{roc,calibration}.png, WORK/stage2/stacker.json (AGG_RULE, CLIP)
	$(PY) -m stage2_classify.evaluate --work $(WORK) --data $(DATA) $(if $(AGG_RULE),--rule $(AGG_RULE)) $(if $(CLIP),--clip $(CLIP))

submit: install  ## the whole test-time engine over the test studies (rule and clip as evaluate recorded, unless AGG_RULE/CLIP): DATA/test_images + WORK/stage1 + WORK/stage2 -> WORK/submission.csv (the rows of test.csv/sample_submission.csv), WORK/predict/<UID>/, WORK/stage2/submit_qc.csv; SHARD=i/N for one share; DICOM=1 adds each study's DICOM SEG + SR
	$(VENV)/bin/cspine submit $(DATA) --work $(WORK) --jobs $(JOBS) $(if $(AGG_RULE),--rule $(AGG_RULE)) $(if $(CLIP),--clip $(CLIP)) $(if $(SHARD),--shard $(SHARD)) $(if $(IF_WORSE),--if-worse-than-prior $(IF_WORSE)) $(if $(DICOM),--dicom)

# ---------------------------------------------------------------- end to end (demo, smoke, report)
# The chain run by `make demo` and `make smoke`, in order; each step skips finished work.
PIPELINE_STEPS := synth check-data folds stage1-prepare stage1-fit crops stage2-fit evaluate submit report
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
	  STAGE2_FOLDS="$(SMOKE_FOLDS)" IF_WORSE=go-on

report: install  ## HTML report of a run: WORK/{qc_data.csv,stage1/,metrics.json,report/*.png,stage2/submit_qc.csv} -> WORK/report/index.html (+ PNGs)
	$(VENV)/bin/cspine report $(WORK) --data $(DATA)

summary: install  ## print the short run summary (stage-1 Dice, metric vs baseline, AUC, output paths) of WORK
	$(VENV)/bin/cspine summary $(WORK) --data $(DATA)
