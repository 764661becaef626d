# syntax=docker/dockerfile:1
# fhir-tenant-router as a Wasm OCI image, the format Istio's WasmPlugin (url: oci://...) and Envoy Gateway's
# EnvoyExtensionPolicy (code.type: Image) pull: FROM scratch, ONE layer, the module as /plugin.wasm, nothing else.
#
# Build and push (BuildKit, the default since Docker 23):
#   docker build -t ghcr.io/your-org/fhir-tenant-router:0.1.0 .                         # compiles in Docker
#   docker build --build-arg WASM_FROM=prebuilt -t ghcr.io/your-org/fhir-tenant-router:0.1.0 .
#                                             # packages target/wasm32-wasip1/release/fhir_tenant_router.wasm as
#                                             # built by `make build` (what CI tested), no compiler in Docker
#   docker push ghcr.io/your-org/fhir-tenant-router:0.1.0
# Check the result: `docker save` it, or `crane export <image> - | tar -t` lists exactly `plugin.wasm`.
# Dockerfile.dockerignore keeps the build context to the sources and that one module.

# "source" (default) or "prebuilt": which stage provides the module. BuildKit builds only the stage used.
ARG WASM_FROM=source

FROM rust:1.95.0-slim AS source
WORKDIR /src
RUN rustup target add wasm32-wasip1
COPY Cargo.toml Cargo.lock ./
COPY src ./src
RUN cargo build --locked --target wasm32-wasip1 --release \
 && cp target/wasm32-wasip1/release/fhir_tenant_router.wasm /fhir_tenant_router.wasm

FROM scratch AS prebuilt
COPY target/wasm32-wasip1/release/fhir_tenant_router.wasm /fhir_tenant_router.wasm

FROM ${WASM_FROM} AS module

# The image: exactly one COPY, so exactly one layer, holding /plugin.wasm.
FROM scratch
COPY --from=module /fhir_tenant_router.wasm /plugin.wasm
