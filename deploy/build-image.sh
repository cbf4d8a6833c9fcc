#!/bin/sh
# Build the mcnp image with no image registry: the Debian 12 base is made from Debian
# packages (mmdebstrap) and imported into podman, then deploy/Containerfile builds on it.
#
#   deploy/build-image.sh [TAG]              (from anywhere; default TAG mcnp:0.1.0)
#   deploy/build-image.sh --podman-options   (print the podman options it uses on this
#                                             host, global then per container, and exit)
#
# Needs root, and the Debian packages mmdebstrap and podman (and runc on hosts with
# hybrid cgroups, see below). Debian packages come from
# this machine's APT sources (MCNP_APT_SOURCES names another sources file), Python
# packages from the index pip is configured with; the build's RUN steps use the host's
# network to reach them (--network=host: no container network is created).
# Environment: MCNP_BASE_TAG (default localhost/mcnp-debian:12; made once and reused,
# MCNP_REBUILD_BASE=1 makes it anew), MCNP_BUILD_CONTEXT (default the repository root),
# MCNP_BUILD_CA (a CA bundle pip trusts during the build, for builders behind a
# TLS-inspecting proxy; default the one pip on this machine is told to use, if any:
# PIP_CERT, REQUESTS_CA_BUNDLE or SSL_CERT_FILE). The bundle is mounted for the build
# only; it is not copied into the image.
set -eu

# Hosts with hybrid cgroups (v1 controllers beside the v2 hierarchy) are refused by crun,
# podman's default runtime on Debian 12; runc runs there. MCNP_PODMAN_OPTS overrides.
if [ -z "${MCNP_PODMAN_OPTS+set}" ]; then
    MCNP_PODMAN_OPTS=
    if [ -d /sys/fs/cgroup/unified ] && command -v runc >/dev/null; then
        MCNP_PODMAN_OPTS="--runtime runc"
    fi
fi
# podman raises a container's open-file and process limits (1048576, 32768), which
# needs CAP_SYS_RESOURCE beyond the caller's hard limits: keep the caller's open-file
# limit and ask for a modest process limit instead.
NOFILE=$(ulimit -Hn)
[ "$NOFILE" = unlimited ] && NOFILE=1048576
CONTAINER_OPTS="--ulimit nofile=$NOFILE:$NOFILE --ulimit nproc=4096:4096"
if [ "${1:-}" = --podman-options ]; then
    printf '%s\n%s\n' "$MCNP_PODMAN_OPTS" "$CONTAINER_OPTS"
    exit 0
fi

TAG=${1:-mcnp:0.1.0}
HERE=$(cd "$(dirname "$0")" && pwd)
CONTEXT=${MCNP_BUILD_CONTEXT:-$(dirname "$HERE")}
BASE_TAG=${MCNP_BASE_TAG:-localhost/mcnp-debian:12}
SUITE=bookworm

if [ -z "${MCNP_APT_SOURCES:-}" ]; then
    for f in /etc/apt/sources.list.d/debian.sources /etc/apt/sources.list; do
        if [ -s "$f" ]; then MCNP_APT_SOURCES=$f; break; fi
    done
fi
if [ -z "${MCNP_APT_SOURCES:-}" ]; then
    echo "build-image: no APT sources found; set MCNP_APT_SOURCES" >&2
    exit 2
fi
for tool in mmdebstrap podman; do
    command -v "$tool" >/dev/null || { echo "build-image: $tool is missing (apt-get install $tool)" >&2; exit 2; }
done

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT INT TERM

# shellcheck disable=SC2086 # the options are words
if [ -n "${MCNP_REBUILD_BASE:-}" ] || ! podman $MCNP_PODMAN_OPTS image exists "$BASE_TAG"; then
    echo "build-image: base file system ($SUITE) from $MCNP_APT_SOURCES"
    mmdebstrap --quiet --variant=apt --include=ca-certificates "$SUITE" "$work/base.tar" "$MCNP_APT_SOURCES"
    # shellcheck disable=SC2086
    podman $MCNP_PODMAN_OPTS import --quiet "$work/base.tar" "$BASE_TAG" >/dev/null
fi

CA=${MCNP_BUILD_CA:-${PIP_CERT:-${REQUESTS_CA_BUNDLE:-${SSL_CERT_FILE:-}}}}
set --
if [ -n "$CA" ]; then
    [ -f "$CA" ] || { echo "build-image: $CA: no such CA bundle" >&2; exit 2; }
    set -- --volume "$CA:/run/mcnp-build-ca.crt:ro" --build-arg BUILD_CA_BUNDLE=/run/mcnp-build-ca.crt
fi
echo "build-image: $TAG on $BASE_TAG"
# shellcheck disable=SC2086
podman $MCNP_PODMAN_OPTS build $CONTAINER_OPTS --network=host --build-arg "BASE=$BASE_TAG" "$@" \
    -f "$HERE/Containerfile" -t "$TAG" "$CONTEXT"
