.PHONY: setup demo test test-fast bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/evolora demo

test: setup
	.venv/bin/python -m pytest -q tests

# the suite without the embedded model and without other processes (kill/resume, torchrun): for quick work
test-fast: setup
	.venv/bin/python -m pytest -q tests -m "not slow and not process"

bench: setup
	.venv/bin/evolora bench benchmarks/mtl5_cpu_suite.yaml
