# `make demo` and `make test` work on a fresh machine: each makes .venv first if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
# torch and torchvision are pinned as a pair: a mismatched torchvision fails to import.
TORCH  := torch==2.14.1 torchvision==0.29.1

.PHONY: venv demo test lint bench clean chromium

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# A real scan of the bundled example. It exits 1 because classes are flagged: that is the demo.
demo: venv
	@mkdir -p out/demo
	$(VENV)/bin/robaudit scan examples/digits/model.onnx --data examples/digits/test.npz \
	    --config examples/digits/robaudit.toml \
	    --json out/demo/report.json --junit out/demo/junit.xml --html out/demo/report.html; \
	code=$$?; echo "robaudit exited with $$code (0: all classes passed, 1: classes flagged)"; \
	test $$code -le 1

# The HTML report is tested in a real headless browser: Debian's chromium.
# Any Chromium or Chrome will do (GitHub's runners have google-chrome); else Debian's, via apt.
chromium:
	@test -n "$$ROBAUDIT_CHROMIUM" || command -v chromium >/dev/null \
	    || command -v chromium-browser >/dev/null || command -v google-chrome >/dev/null \
	    || { sudo=$$(test "$$(id -u)" = 0 || echo sudo); \
	         $$sudo apt-get update && $$sudo apt-get install -y chromium; }

test: venv chromium
	$(PY) -m pytest

lint: venv
	$(PY) -m ruff check robaudit tests examples benchmarks

clean:
	rm -rf $(VENV) out build dist .pytest_cache .ruff_cache

# Attack-engine benchmarks (ratios measured side by side); results go in benchmarks/RESULTS.md.
bench: venv
	$(PY) -m pip install --quiet torchattacks==3.5.1
	$(PY) benchmarks/bench_attacks.py
	$(PY) benchmarks/bench_verdict.py

# The paper's six findings on the bundled examples: runs robaudit's own commands on the shipped
# models (minutes on 2 cores, no training beyond harden's short fine-tune), rewrites docs/findings.md.
.PHONY: findings
findings: venv
	$(PY) docs/make_findings.py
