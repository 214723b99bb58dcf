# syntax=docker/dockerfile:1
# Twill's node image: twill-agent (with its embedded eBPF object) and the twill-cni plugin.
#
#   docker build -t <registry>/twill:<tag> .        (from the repository root)
#
# `cargo xtask image` builds the same content without a registry (debootstrap of the same suite
# with the same packages, the same binaries and CMD; tests/src/image.rs): keep the two in step.
#
# The builder repeats the toolchain part of `cargo xtask setup` (which also mounts bpffs and
# installs the lab's Debian packages — neither is possible nor needed inside `docker build`):
# a nightly with rust-src for `-Z build-std=core` on the bpf target, and bpf-linker built
# against the nightly rustc's own libLLVM (Debian 12 has no LLVM of that version).

ARG RUST_VERSION=1.95

FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# The toolchain named `nightly`, as `cargo xtask setup` installs it: aya-build runs
# `cargo +nightly` for the bpf target.
RUN rustup toolchain install nightly --profile minimal --component rust-src
# bpf-linker must use exactly the nightly rustc's LLVM: link rustc's libLLVM under a prefix and
# build against it with the matching llvm-N feature (the recipe of xtask/src/setup.rs).
RUN set -eux; \
    sysroot="$(rustc +nightly --print sysroot)"; \
    set -- "$sysroot"/lib/libLLVM*.so*; so="$(basename "$1")"; \
    major="$(echo "$so" | sed -E 's/^libLLVM[.-](so\.)?([0-9]+).*/\2/')"; \
    dir=/opt/rust-llvm/lib; mkdir -p "$dir"; \
    ln -sf "$sysroot/lib/$so" "$dir/libLLVM.so"; ln -sf "$sysroot/lib/$so" "$dir/$so"; \
    LLVM_PREFIX=/opt/rust-llvm cargo install bpf-linker --no-default-features --features "llvm-$major"; \
    bpf-linker --version
WORKDIR /src
COPY . .
# twill-agent's build script compiles proxy-ebpf for the bpf target with the nightly and
# bpf-linker above and embeds the object.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=twill-target \
    cargo build --locked --release -p twill-agent -p twill-cni --bins \
 && mkdir -p /out \
 && cp target/release/twill-agent target/release/twill-cni /out/

FROM docker.io/library/debian:bookworm-slim
# nftables: the agent's egress masquerade table (`nft -f`); iproute2: `ip` for the uninstall
# guide's route cleanup and for debugging; mount: the mount-bpffs init container.
# Unpinned on purpose: bookworm's security updates replace pinned versions in the archive.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates iproute2 nftables mount \
 && rm -rf /var/lib/apt/lists/*
COPY --from=builder /out/twill-agent /usr/local/bin/twill-agent
COPY --from=builder /out/twill-cni /usr/local/bin/twill-cni
# No ENTRYPOINT: the DaemonSet names each container's command, and `kubectl debug node/... --
# sh` (the uninstall guide) gets a shell.
CMD ["/usr/local/bin/twill-agent", "--help"]
