# hapair: build, stage, test and demo. `make help` lists the targets.

SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
ANSIBLE_PLAYBOOK := $(VENV)/bin/ansible-playbook
# The hapair.ha collection, laid out by `make stage`; ansible.cfg's
# collections_path points here, so the playbooks name each module
# hapair.ha.MODULE, as a user of the built collection does.
COLLECTIONS := target/collection
COLLECTION := $(COLLECTIONS)/ansible_collections/hapair/ha
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
# Every crate under modules/ but the shared core is a module.
MODULES := $(filter-out core,$(patsubst modules/%/Cargo.toml,%,$(wildcard modules/*/Cargo.toml)))
# `make fleet-up FLEET=name HOSTS=n NET=k` starts hosts on 198.18.k.0/24.
FLEET ?= demo
HOSTS ?= 2
NET ?= 0

export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg

.PHONY: help build stage collection venv maven-deps image fleet-up fleet-down demo test test-unit test-fleet bench lint fuzz fuzz-smoke clean

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-12s %s\n", $$1, $$2}'

build: ## Build every module (release: small, stripped)
	cargo build --release --workspace --bins

# Each module's action is plugins/action/hapair_module.py (one round trip
# per task: see the file), named in the collection's meta/runtime.yml.
stage: build ## Lay out the hapair.ha collection (modules, docs, action, playbooks) where the playbooks find it
	@collection/stage $(COLLECTION) $(VERSION) $(MODULES)
	@echo "staged the hapair.ha collection in $(COLLECTION): $(MODULES)"

collection: stage venv ## Build the hapair.ha collection's file for ansible-galaxy collection install
	$(VENV)/bin/ansible-galaxy collection build $(COLLECTION) --output-path target --force
	@echo "install it with: ansible-galaxy collection install target/hapair-ha-$(VERSION).tar.gz"

venv: $(VENV)/.installed ## Create the Python venv with ansible-core (pinned)
$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
	@touch $@

maven-deps: ## Fetch Kafka's jars for the test image into the local Maven cache
	mvn -q -B -Dstyle.color=never -f tests/fleet/kafka/pom.xml dependency:resolve

image: ## Build the test hosts' image (skipped when its inputs are unchanged)
	tests/fleet/build-image

fleet-up: ## Start a fleet of test hosts (FLEET=demo HOSTS=2 NET=0)
	tests/fleet/fleet up $(FLEET) $(HOSTS) $(NET)

fleet-down: ## Remove a fleet of test hosts (FLEET=demo)
	tests/fleet/fleet down $(FLEET)

# The demo's hosts are throwaway test hosts made a moment ago, with no data
# to lose: the one place where the unsafe steps are confirmed for the user.
demo: venv stage image fleet-up ## Start a pair of test hosts, set it up, and show a write of each service arrive
	$(ANSIBLE_PLAYBOOK) -i inventory/fleet-$(FLEET).ini playbooks/ha_setup.yml --diff \
	  -e hapair_confirm_unsafe_steps=true
	$(ANSIBLE_PLAYBOOK) -i inventory/fleet-$(FLEET).ini playbooks/demo.yml
	@echo
	@echo "Status pages:                    http://198.18.$(NET).11:8080/  http://198.18.$(NET).12:8080/"
	@echo "Run it again (nothing changes):  $(ANSIBLE_PLAYBOOK) -i inventory/fleet-$(FLEET).ini playbooks/ha_setup.yml -e hapair_confirm_unsafe_steps=true"
	@echo "Log in to the primary:           ssh -F target/fleet/$(FLEET)/ssh_config 198.18.$(NET).11"
	@echo "Log in to the secondary:         ssh -F target/fleet/$(FLEET)/ssh_config 198.18.$(NET).12"
	@echo "Remove the pair:                 make fleet-down FLEET=$(FLEET)"

test: test-unit test-fleet ## Run every test: unit, then modules and playbooks on real hosts

test-unit: ## Unit tests of the core and the modules (no hosts)
	cargo test --workspace --exclude hapair-tests

# The failover suite, the longest, and then the crash suites run beside
# the others: every suite has hosts and a subnet of its own. Their output
# follows the others', in one piece.
BESIDE := failover crash_stop crash_kill
SUITES := $(filter-out $(BESIDE) bench_%,$(basename $(notdir $(wildcard tests/*.rs))))

test-fleet: venv stage image ## Module and end-to-end tests on fleet hosts
	cargo test -p hapair-tests --tests --no-run
	@mkdir -p target/fleet
	@cargo test -p hapair-tests --no-fail-fast $(addprefix --test ,$(BESIDE)) >target/fleet/beside.log 2>&1 & beside=$$!; \
	cargo test -p hapair-tests --no-fail-fast $(addprefix --test ,$(SUITES)); others=$$?; \
	wait $$beside; besides=$$?; \
	echo "---- $(BESIDE), run beside the others ----"; \
	cat target/fleet/beside.log; \
	[ $$others -eq 0 ] && [ $$besides -eq 0 ]

bench: stage image ## A task against raw, the set-up, its re-run and three pairs at once, step 8's copy against tar, Redis's 1 GiB sync, MirrorMaker's catch-up, the monitor's latency, rejoin by rewind against a full copy
	cargo bench -p hapair-tests --bench bench_tasks
	cargo bench -p hapair-tests --bench bench_copy
	cargo bench -p hapair-tests --bench bench_sync
	cargo bench -p hapair-tests --bench bench_monitor
	cargo bench -p hapair-tests --bench bench_rejoin

FUZZ_SECONDS ?= 120
fuzz: ## Fuzz every parser and config editor, FUZZ_SECONDS each (cargo fuzz, nightly)
	fuzz/run $(FUZZ_SECONDS)

fuzz-smoke: ## A short fuzz of each target from the kept corpus (CI runs it)
	fuzz/run 10

# ansible-lint reads the example's vault with its example password.
lint: stage venv ## Formatting, clippy, and ansible-lint's production profile on the playbooks and inventories
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH ANSIBLE_VAULT_PASSWORD_FILE=inventory/example/vault-password.example ansible-lint

clean: ## Remove build output, staged modules and fleet state
	cargo clean
	rm -rf $(COLLECTIONS) inventory/fleet-*.ini
