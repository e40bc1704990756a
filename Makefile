# The README's two commands: `make repro` (run the pipeline) and `make test` (run the tests).
# Both start with `make env`, which creates .venv and installs the project once; a second run
# installs nothing (the stamp file is newer than pyproject.toml and requirements.lock).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.anchorformer-installed
export PATH := $(abspath $(BIN)):$(PATH)
export HF_HUB_OFFLINE := 1
export DVC_NO_ANALYTICS := 1
export PYTHONHASHSEED := 0
# Bytecode writing on (some machines set PYTHONDONTWRITEBYTECODE, which would hide a __pycache__/
# written beside the stages' sources): the tests then check that .dvcignore keeps it out of DVC.
unexport PYTHONDONTWRITEBYTECODE

.PHONY: env repro test test-slow test-all test-fast test-notebooks test-lab lab-browser lint lab clean-venv

# The project's Jupyter kernel, registered inside .venv (not in ~/.local): JupyterLab lists it as
# "anchorformer (.venv)" and the notebooks name it; the stages and nbval run the current interpreter.
KERNEL := $(VENV)/share/jupyter/kernels/anchorformer/kernel.json
# JupyterLab's settings for this project (scripts/lab_overrides.json: no news pop-up, no update
# check), installed as the environment's overrides: they apply to every Lab started from .venv.
LAB_OVERRIDES := $(VENV)/share/jupyter/lab/settings/overrides.json

env: $(STAMP) $(KERNEL) $(LAB_OVERRIDES)

# Every version comes from requirements.lock; the project is installed editable with all its extras.
# timm's source distribution gives its own model tests (tests/test_timm_models.py), run on ours.
EXTRAS := kernels,export,pipeline,notebooks,dev

$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -r requirements.lock -e ".[$(EXTRAS)]"
	$(BIN)/python -m pip download --quiet --no-deps --no-binary :all: -c requirements.lock timm -d $(VENV)/src
	touch $(STAMP)

# Its spec carries the numeric path's settings (scripts/kernel_env.py), so that a notebook run in
# JupyterLab computes the bytes of the pipeline's stages; ANCHORFORMER_NUMERICS=native leaves them out.
$(KERNEL): $(STAMP) scripts/kernel_env.py anchorformer/engine/numerics.py
	$(BIN)/python -m ipykernel install --sys-prefix --name anchorformer --display-name "anchorformer (.venv)" \
		$$($(BIN)/python scripts/kernel_env.py)

$(LAB_OVERRIDES): scripts/lab_overrides.json $(STAMP)
	mkdir -p $(dir $@)
	cp scripts/lab_overrides.json $@

# The pipeline, independent stages side by side (scripts/repro.py: each stage is a
# `dvc repro --single-item`; one stage per core on the mini profile, one at a time on the full
# one; REPRO_JOBS=N overrides). The outputs and dvc.lock are those of a plain `dvc repro`.
REPRO_JOBS ?= auto

repro: env
	$(BIN)/python scripts/repro.py --jobs $(REPRO_JOBS)

# The tests, then every notebook top to bottom with its smoke defaults (nbval, started in
# notebooks/ as JupyterLab does; cells marked NBVAL_CHECK_OUTPUT are compared with their stored
# outputs), without the tests marked slow (make test-slow): the default run, under 20 minutes on
# 2 cores. tests/test_notebooks.py runs notebook 01 from the repository root too, as DVC does, and
# every notebook from there in its slow test.
NBVAL := --nbval-lax --nbval-current-env --nbval-cell-timeout=900

test: env
	$(BIN)/python -m pytest tests notebooks -m "not slow and not lab" $(NBVAL)
	$(MAKE) test-lab

# JupyterLab in a real browser (tests/test_lab.py): `jupyter lab` on a free local port with a
# token, Debian's Chromium driven by Playwright, Run All Cells through the menu in notebooks 01, 10
# (smoke) and 90; screenshots of the last run in build/test-lab/. Lab's settings, workspaces and
# runtime files go to a temporary folder. Chromium comes from the system (`apt-get install
# chromium`; installed here when running as root with apt, as in CI); without it the test is
# skipped with a line saying so.
test-lab: env lab-browser
	$(BIN)/python -m pytest tests/test_lab.py -m lab -p no:cacheprovider

lab-browser:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing Chromium for make test-lab (apt-get install chromium)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "no chromium on PATH: tests/test_lab.py will be skipped (sudo apt-get install chromium)"; fi

# The tests marked slow (multi-process runs, every variant and notebook, the Triton interpreter
# suite, the bare-wheel install): tens of minutes on 2 cores.
test-slow: env
	$(BIN)/python -m pytest tests -m slow

test-all: env lab-browser
	$(BIN)/python -m pytest tests notebooks $(NBVAL)

test-fast: env
	$(BIN)/python -m pytest tests -m "not slow and not lab"

test-notebooks: env
	$(BIN)/python -m pytest notebooks $(NBVAL)

# The package, tests, scripts and notebooks (ruff reads .ipynb itself; named one by one since
# pyproject.toml's extend-exclude leaves them out of directory walks); the notebooks stored clean;
# each DVC stage depending on what its notebooks import.
NOTEBOOK_FILES := $(wildcard notebooks/*.ipynb)

lint: env
	$(BIN)/ruff check anchorformer tests scripts $(NOTEBOOK_FILES)
	$(BIN)/ruff format --check anchorformer tests scripts $(NOTEBOOK_FILES)
	$(BIN)/python scripts/clean_notebooks.py --check
	$(BIN)/python scripts/dvc_deps.py --check

# JupyterLab serving the repository (the report, outputs/ and README open from its file browser),
# opening on notebooks/, with the project's kernel; as root (containers) it needs --allow-root.
LAB_FLAGS ?= $(if $(filter 0,$(shell id -u)),--allow-root)

lab: env
	$(BIN)/jupyter lab --ServerApp.root_dir="$(CURDIR)" --ServerApp.default_url=/lab/tree/notebooks $(LAB_FLAGS)

clean-venv:
	rm -rf $(VENV)
