# The two quick-start commands: `make demo` and `make test` (README).
.PHONY: demo test lint

demo:
	scripts/install.sh
	.venv/bin/denoise-node demo

test:
	scripts/install.sh test
	.venv/bin/ruff check .
	.venv/bin/python -m pytest -p no:cacheprovider

lint:
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .
