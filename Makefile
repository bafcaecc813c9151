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

test: install browser dicom-validator  ## run the test suite (slow tests included; skip them with PYTEST_ARGS='-m "not slow"'); the page tests open the HTML pages in headless Chromium
	WANDB_MODE=disabled $(PY) -m pytest -q $(PYTEST_ARGS)

lint: install  ## ruff (pyflakes, pycodestyle, bugbear, import order; settings in pyproject.toml) over the whole repository; CI runs it before the tests
	$(VENV)/bin/ruff check .

.PHONY: browser
browser:  ## headless Chromium for the page tests: Debian's chromium package, installed with apt-get when missing (as root), else a message saying how
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	    command -v google-chrome >/dev/null 2>&1 || [ -n "$$CHROMIUM" ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make browser: installing Debian's chromium package for the page tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null || exit 1; \
	else \
	  echo "make browser: the page tests need Chromium: install the 'chromium' package (apt-get install chromium, as root), set CHROMIUM=/path/to/chrome, or skip them on purpose with CSPINE_NO_BROWSER=1" >&2; exit 1; \
	fi

.PHONY: dicom-validator
dicom-validator:  ## dciodvfy (Debian's dicom3tools) for the DICOM SEG/SR validation test: installed with apt-get when missing (as root); elsewhere that test skips with its reason
	@if command -v dciodvfy >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	  echo "make dicom-validator: installing Debian's dicom3tools (dciodvfy) for the SEG/SR test"; \
	  { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dicom3tools >/dev/null; } || \
	    echo "make dicom-validator: dicom3tools could not be installed; the SEG/SR validation test will skip" >&2; \
	else \
	  echo "make dicom-validator: no dciodvfy (apt-get install dicom3tools); the SEG/SR validation test will skip" >&2; \
	fi

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

# Training targets skip a finished run only when its inputs are unchanged: `cspine fit` hashes
# the resolved settings (the stage's own parser; no paths, no logging) and the input tables, and
# decides skip | resume (from last.ckpt) | retire (moved to <run>.stale-<n>/, never deleted) |
# fresh (cspine/runs.py, tested in tests/test_runs.py).

# ---------------------------------------------------------------- stage 1 (stage1_segment)
STAGE1_CONFIG ?= configs/stage1/cpu.yaml
STAGE1_CKPT ?= best
STAGE1_ARGS ?=
S1 := --data.data_root $(DATA) --data.work_dir $(WORK)
.PHONY: stage1-prepare stage1-fit crops
stage1-prepare: install  ## stage-1 training cache (STAGE1_CONFIG data: grid) of the segmented train studies: DATA DICOM + segmentations -> WORK/stage1/cache/<key>/<UID>.npz (model grid), WORK/cache/volumes/<UID>.npz (decoded once, read by crops), WORK/stage1/qc_prepare.csv; cached studies are skipped
	$(PY) -m stage1_segment.prepare -c $(STAGE1_CONFIG) --data-root $(DATA) --work-dir $(WORK) --jobs $(JOBS) $(STAGE1_ARGS)

stage1-fit: install  ## train the segmenter (STAGE1_CONFIG, STAGE1_ARGS) on WORK/stage1/cache + WORK/folds.csv -> WORK/stage1/checkpoints/{best,last}.ckpt, WORK/stage1/run.json, WORK/stage1/wandb; skipped when finished with the same settings and inputs, resumed from last.ckpt when interrupted, else the old run moves to WORK/stage1.stale-<n>/
	$(VENV)/bin/cspine fit stage1 $(DATA) --work $(WORK) -c $(STAGE1_CONFIG) --jobs $(JOBS) $(STAGE1_ARGS)

crops: install  ## stage-1 part of the test-time engine over the train studies with STAGE1_CKPT (best|last|path), crop settings from STAGE1_CONFIG crops: -> WORK/stage1/crops/<UID>_<C#>.npz + vertebrae.csv (the stage-2 manifest) + qc_crops.csv, WORK/stage1/masks/<UID>.nii.gz; SHARD=i/N for one share
	$(VENV)/bin/cspine crops $(DATA) --work $(WORK) -c $(STAGE1_CONFIG) --stage1-ckpt $(STAGE1_CKPT) --jobs $(JOBS) $(if $(SHARD),--shard $(SHARD)) $(STAGE1_ARGS)

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
# ANATOMY_LIMITS=FILE: YAML overriding the anatomy check's limits (stage1_segment/anatomy.py)
ANATOMY_LIMITS ?=
IF_WORSE ?=
DICOM ?=
.PHONY: stage2-fit evaluate submit
stage2-fit: install  ## train stage 2 (FOLD=k, else every fold of STAGE2_FOLDS in turn; STAGE2_CONFIG, STAGE2_ARGS) on WORK/stage1/crops/vertebrae.csv + DATA/train.csv + WORK/folds.csv -> WORK/stage2/fold<k>/ (checkpoints, run.json, wandb), WORK/stage2/oof/fold<k>.csv; a finished fold with the same settings and inputs is skipped, an interrupted one resumes, a stale one moves to fold<k>.stale-<n>/
	$(VENV)/bin/cspine fit stage2 $(DATA) --work $(WORK) -c $(STAGE2_CONFIG) --folds $(if $(FOLD),$(FOLD),$(STAGE2_FOLDS)) $(STAGE2_ARGS)

evaluate: install  ## stage-2 OOF evaluation: WORK/stage2/oof/fold*.csv + DATA/train.csv -> WORK/oof.csv, WORK/metrics.json (records the rule, clip and the operating points for sensitivities 0.80/0.90/0.95 + Youden), WORK/report/{roc,calibration}.png, WORK/stage2/stacker.json (AGG_RULE, CLIP)
	$(PY) -m stage2_classify.evaluate --work $(WORK) --data $(DATA) $(if $(AGG_RULE),--rule $(AGG_RULE)) $(if $(CLIP),--clip $(CLIP))

submit: install  ## the whole test-time engine over the test studies (rule and clip as evaluate recorded, unless AGG_RULE/CLIP): DATA/test_images + WORK/stage1 + WORK/stage2 -> WORK/submission.csv (the rows of test.csv/sample_submission.csv), WORK/predict/<UID>/, WORK/stage2/submit_qc.csv; SHARD=i/N for one share; DICOM=1 adds each study's DICOM SEG + SR
	$(VENV)/bin/cspine submit $(DATA) --work $(WORK) --jobs $(JOBS) $(if $(AGG_RULE),--rule $(AGG_RULE)) $(if $(CLIP),--clip $(CLIP)) $(if $(SHARD),--shard $(SHARD)) $(if $(IF_WORSE),--if-worse-than-prior $(IF_WORSE)) $(if $(DICOM),--dicom) $(if $(ANATOMY_LIMITS),--anatomy-limits $(ANATOMY_LIMITS))

# ---------------------------------------------------------------- external validation
# VAL_DATA: labelled studies not used for training (RSNA-layout folder or CSV, see
# docs/validation.md); COMPARE: a second training folder scored on the same studies
VAL_DATA ?=
VAL_OUT ?=
COMPARE ?=
VAL_ARGS ?=
.PHONY: validate
validate: install  ## external validation of WORK's models (through the test-time engine) on VAL_DATA (RSNA layout or CSV; operating points from WORK/metrics.json, make evaluate) -> VAL_OUT (default WORK/validation/<name>)/{index.html,metrics.json,predictions.csv,qc.csv,roc.png,reliability.png,overviews/}; COMPARE=WORK_B, VAL_ARGS for more flags
	@test -n "$(VAL_DATA)" || { echo "make validate: set VAL_DATA=<RSNA-layout folder or CSV of labelled studies not used for training>" >&2; exit 2; }
	$(VENV)/bin/cspine validate $(VAL_DATA) --work $(WORK) --jobs $(JOBS) $(if $(VAL_OUT),--out $(VAL_OUT)) $(if $(COMPARE),--compare $(COMPARE)) $(VAL_ARGS)

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
