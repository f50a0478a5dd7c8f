# The quick-start commands: `make demo` and `make test` (README); `make test-fast` while editing.
.PHONY: demo test test-fast lint typecheck

FAST = not postgres and not orthanc and not browser and not slow and not load and not training

demo:
	scripts/install.sh
	.venv/bin/denoise-node demo

# The full suite: what CI runs (.ci/run).
test:
	scripts/install.sh test
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/python -m pytest -p no:cacheprovider

# A fast subset of the node's tests (no Orthanc, no PostgreSQL, no browser, no reliability
# scenarios, no training-code tests), under 3 minutes.
test-fast:
	.venv/bin/ruff check .
	.venv/bin/mypy
	.venv/bin/python -m pytest -p no:cacheprovider -m "$(FAST)"

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

typecheck:
	.venv/bin/mypy
