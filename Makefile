.PHONY: setup demo test bench

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/evolora demo

test: setup
	.venv/bin/python -m pytest -q tests

bench: setup
	.venv/bin/evolora bench benchmarks/mtl5_cpu_suite.yaml
