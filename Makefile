# orders-cdc. `make run-local` runs the whole thing on this machine; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
LSVENV := .venv-localstack
PY := $(VENV)/bin/python
M2 := $(CURDIR)/.kcl/m2
STAMP := .local/stamps

.PHONY: install run-local test test-fast test-integration test-faults bench local-down clean help

help:
	@echo "make install | run-local | test | test-fast | test-integration | bench | local-down | clean"

install: $(STAMP)/venv $(STAMP)/localstack

# The KCL jars: Maven resolves amazon-kclpy's own jar list from Maven Central into a
# project-local repository; amazon-kclpy's installer then copies them from there.
$(STAMP)/kcl-m2: infra/kcl/pom.xml
	@mkdir -p $(STAMP)
	mvn -B -q -f infra/kcl/pom.xml -Dmaven.repo.local=$(M2) dependency:resolve
	@touch $@

$(STAMP)/venv: pyproject.toml $(STAMP)/kcl-m2
	@mkdir -p $(STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	KCL_MVN_REPO_SEARCH_URL=file://$(M2)/ $(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "from orders_cdc.kcl.daemon import jars_dir; print('KCL jars:', jars_dir())"
	@touch $@

# LocalStack (Kinesis only) runs on the host from PyPI, in its own venv: it pins its own
# boto3/botocore. 4.9.2 is the newest release that runs on Python 3.11 (see README).
$(STAMP)/localstack: infra/local/localstack-requirements.txt
	@mkdir -p $(STAMP)
	test -x $(LSVENV)/bin/python || $(PYTHON) -m venv $(LSVENV)
	$(LSVENV)/bin/python -m pip install -q --upgrade pip
	$(LSVENV)/bin/python -m pip install -q -r infra/local/localstack-requirements.txt
	@touch $@

run-local: install
	$(PY) -m orders_cdc.cli local demo

local-down:
	$(PY) -m orders_cdc.cli local down

# The whole suite, real-daemon integration and fault tests included (CI runs this).
test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not integration and not faults"

test-integration: install
	$(PY) -m pytest -m integration

# Benchmarks (bench/): B1-B4, a table in the terminal and bench/results.json. Not tests:
# nothing fails on speed. The bench extra (Powertools for B2, py-spy for B1's profile) is
# installed on first use.
bench: install
	@$(PY) -c "import aws_lambda_powertools" 2>/dev/null && test -x $(VENV)/bin/py-spy || \
		KCL_MVN_REPO_SEARCH_URL=file://$(M2)/ $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(LSVENV) .kcl .local
