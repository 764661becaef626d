# syntax=docker/dockerfile:1
# fhir-tenant-router as a Wasm OCI image, the format Istio's WasmPlugin (url: oci://...) and Envoy Gateway's
# EnvoyExtensionPolicy (code.type: Image) pull: FROM scratch, ONE layer, the module as /plugin.wasm, nothing else.
#
# Build for linux/amd64 and push (BuildKit, the default since Docker 23):
#   docker build --platform linux/amd64 -t ghcr.io/your-org/fhir-tenant-router:0.1.0 .
#   docker push ghcr.io/your-org/fhir-tenant-router:0.1.0
#   crane digest --platform linux/amd64 ghcr.io/your-org/fhir-tenant-router:0.1.0   # what to pin (sha256)
# --platform linux/amd64 whatever machine builds it: the gateways fetch with go-containerregistry, which picks
# the linux/amd64 image out of an index and refuses an index without one (an arm64 laptop's default build).
# This file cannot fix it for you: BuildKit gives a `FROM scratch` image the build's target platform, whatever
# a --platform on that FROM says. The module itself is platform-neutral and compiled natively on the build
# machine (no emulation).
#
#   docker build --platform linux/amd64 --build-arg WASM_FROM=prebuilt -t ghcr.io/your-org/fhir-tenant-router:0.1.0 .
# packages target/wasm32-wasip1/release/fhir_tenant_router.wasm as `make build` left it (what CI tested), with
# no compiler in Docker.
# Check the result: `crane export --platform linux/amd64 <image> - | tar -t` lists exactly `plugin.wasm`.
# Dockerfile.dockerignore keeps the build context to the sources, the Makefile and that one module.

# "source" (default) or "prebuilt": which stage provides the module. BuildKit builds only the stage used.
ARG WASM_FROM=source

# The module `make build` ships, built by `make build` itself: the same cargo features (no pure-Rust P-384)
# and the same `wasm-opt -Oz` (binaryen 108, Debian 12's, as on CI), from the locked dependencies.
FROM --platform=$BUILDPLATFORM rust:1.95.0-slim-bookworm AS source
RUN apt-get update && apt-get install -y --no-install-recommends make binaryen && rm -rf /var/lib/apt/lists/*
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY Cargo.toml Cargo.lock Makefile ./
COPY src ./src
RUN make build CARGO_FLAGS=--locked REQUIRE_WASM_OPT=1 \
 && cp target/wasm32-wasip1/release/fhir_tenant_router.wasm /fhir_tenant_router.wasm

FROM scratch AS prebuilt
COPY target/wasm32-wasip1/release/fhir_tenant_router.wasm /fhir_tenant_router.wasm

FROM ${WASM_FROM} AS module

# The image: exactly one COPY, so exactly one layer, holding /plugin.wasm.
FROM scratch
COPY --from=module /fhir_tenant_router.wasm /plugin.wasm
