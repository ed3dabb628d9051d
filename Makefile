# Everything a fresh machine needs: `make demo` and `make test` create ./.venv on first use.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test lint bench report-check clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# CPU wheel where no torch is present; a plain `torch` requirement would pull a multi-GB CUDA build
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ltbench run --model ltad

test: $(STAMP)
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(VENV)/bin/python -m pytest -q

lint: $(STAMP)
	$(VENV)/bin/ruff check ltbench ltad_model baselines tests bench tools

bench: $(STAMP)
	$(PY) bench/metrics.py
	$(PY) bench/features.py

# Render a short synth run's reports in headless Chromium (Debian: chromium-headless-shell, installed if missing)
report-check: $(STAMP)
	command -v chromium-headless-shell >/dev/null || command -v chromium >/dev/null || \
		apt-get install -y chromium-headless-shell
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(PY) tools/report_check.py --out report-check

clean:
	rm -rf $(VENV) build dist report-check *.egg-info
