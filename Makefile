# Shortcuts for the project's scripts (the scripts are the reference; `make` is optional).
.PHONY: help test run setup bench servers cluster fuzz

help:
	@echo "make test      - scripts/test: set up (packages, .venv, Kafka jars, helm) and run the tests"
	@echo "make run       - scripts/run: set up and run the pipeline locally (DEPS='69 01 38' ARGS='--standin')"
	@echo "make setup     - scripts/setup --tests: set up only"
	@echo "make bench     - the benchmarks: print the table and write bench/results.json (ARGS='--rows 20000')"
	@echo "make fuzz      - the property tests with random inputs for MINUTES (default 10): inputs tried, failures"
	@echo "make servers   - Kafka + PostgreSQL + ADEME stand-in in the foreground (Ctrl-C stops)"
	@echo "make cluster   - the test cluster (single-node Kubernetes, root) in the foreground: prints its KUBECONFIG (Ctrl-C stops)"

test:
	scripts/test $(ARGS)

run:
	scripts/run $(or $(DEPS),69 01 38) $(ARGS)

setup:
	scripts/setup --tests

bench:
	scripts/setup
	.venv/bin/python bench/run.py $(ARGS)

fuzz:
	scripts/setup
	.venv/bin/python bench/fuzz.py --minutes $(or $(MINUTES),10) $(ARGS)

servers:
	scripts/setup
	.venv/bin/dpe-ingest testbed up $(ARGS)

cluster:
	scripts/setup --tests
	.venv/bin/dpe-ingest testbed cluster up $(ARGS)
