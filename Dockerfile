# Builder ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src

# Build dependencies against stub sources first so this layer is reused until
# Cargo.toml/Cargo.lock change. The stub test and bench targets exist only
# because the manifest declares them.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src tests/api benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > tests/api/main.rs \
    && echo 'fn main() {}' > benches/pdp.rs \
    && cargo build --release --locked --bin agentidp \
    && rm -rf src

COPY src ./src
# The console's templates are compiled into the binary.
COPY templates ./templates
COPY migrations ./migrations
COPY config ./config
COPY openapi ./openapi
COPY .sqlx ./.sqlx
# No database at build time: sqlx macros check queries against .sqlx.
ENV SQLX_OFFLINE=true
# COPY keeps the context's mtimes, which may predate the stub build; touch so
# cargo rebuilds the crate itself.
RUN touch src/main.rs src/lib.rs \
    && cargo build --release --locked --bin agentidp

# Runtime ------------------------------------------------------------------
FROM debian:bookworm-slim
# curl is only for HEALTHCHECK.
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 agentidp \
    && useradd --system --uid 10001 --gid agentidp --no-create-home --shell /usr/sbin/nologin agentidp

COPY --from=builder /src/target/release/agentidp /usr/local/bin/agentidp

# The default bind is loopback, unreachable from outside the container.
ENV AGENTIDP_SERVER__BIND=0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s \
    CMD curl -fsS http://127.0.0.1:8080/health || exit 1

USER agentidp
ENTRYPOINT ["agentidp"]
CMD ["serve"]
