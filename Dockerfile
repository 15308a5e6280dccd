# syntax=docker/dockerfile:1
#
# One image for every role: `vlm-mesh serve gateway|encoder|projector|decoder …` (the Helm chart in
# helm/vlm-mesh passes the arguments). Models are never baked in: mount a checkpoint (PVC,
# hostPath, or an init container filling an emptyDir) and pass --model. (The binary carries only
# the ~4 MB demo model, `--model bundled:shapes-llava`, unpacked into $HOME/.cache or /tmp.)
#
#   docker build -t vlm-mesh:0.1.0 .
#   docker run --rm vlm-mesh:0.1.0 --help

# Keep in step with the toolchain CI builds with (`.ci/run` → scripts/test.sh → cargo … --locked).
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
# Everything the workspace needs to build; .dockerignore keeps out target/, .git and the models.
COPY . .
# The same build as CI's: the committed Cargo.lock (--locked), protos compiled in build.rs by protox
# (no protoc), rustls (no OpenSSL). Only the profile differs: CI tests the debug build, the image
# ships the release build of the one binary.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin vlm-mesh \
 && install -D -m 0755 target/release/vlm-mesh /out/vlm-mesh

# glibc + libgcc + CA certificates and nothing else (no shell, no package manager);
# runs as uid/gid 65532 ("nonroot").
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /out/vlm-mesh /usr/local/bin/vlm-mesh
USER 65532:65532
# 50051: gRPC (mTLS on internal stages, TLS on the gateway); 8081: plaintext grpc.health.v1 for probes;
# 9090: Prometheus metrics (--metrics-listen); 8080: the gateway's OpenAI endpoint (--http-listen).
EXPOSE 50051 8081 9090 8080
ENTRYPOINT ["/usr/local/bin/vlm-mesh"]
CMD ["--help"]
