# Shortcuts for the project's scripts (the scripts are the reference; `make` is optional).
.PHONY: test fetch bench help

help:
	@echo "make test   - scripts/test: set up (packages, .venv, bench cache) and run the tests"
	@echo "make fetch  - set up and fetch/build the bench's Kafka jars, PostgreSQL template, helm"
	@echo "make bench  - start Kafka + PostgreSQL + ADEME stand-in in the foreground (Ctrl-C stops)"

test:
	scripts/test $(ARGS)

fetch:
	scripts/test --setup-only

bench: fetch
	.venv/bin/dpe-ingest bench up $(ARGS)
