# One multi-stage build for every Baton binary: the CLI (`baton`) and the six agents.
# The agents are small static-ish Rust binaries on a slim Debian base.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked \
      -p baton-cli -p baton-builder -p baton-deployer -p baton-health-checker \
      -p baton-rollback -p baton-metrics -p baton-notifier

FROM debian:bookworm-slim AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build \
     /src/target/release/baton \
     /src/target/release/baton-builder \
     /src/target/release/baton-deployer \
     /src/target/release/baton-health-checker \
     /src/target/release/baton-rollback \
     /src/target/release/baton-metrics \
     /src/target/release/baton-notifier \
     /usr/local/bin/
# No shell is needed at run time; run as an unprivileged user.
USER 65532:65532
ENTRYPOINT []
