#!/usr/bin/env bash
# CI only: make the container tools and a `debian:bookworm-slim` base image on a host that reaches no
# container registry (debootstrap from the host's Debian mirror), so that the published Dockerfiles
# build unchanged. Where the host re-signs TLS with a local CA, the base image carries that CA bundle
# for pip: a test-only setting that never enters docker/Dockerfile*.
set -euo pipefail
need=()
for tool in podman buildah debootstrap runc; do command -v "$tool" >/dev/null || need+=("$tool"); done
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends buildah podman debootstrap runc uidmap \
    containernetworking-plugins >/dev/null
fi
if podman image exists docker.io/library/debian:bookworm-slim; then
  exit 0
fi
mirror=$(awk '/^URIs:/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >/dev/null
changes=(--change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin')
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  install -D -m 644 /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/host-ca.crt"
  for var in PIP_CERT REQUESTS_CA_BUNDLE SSL_CERT_FILE; do
    changes+=(--change "ENV $var=/etc/ssl/host-ca.crt")
  done
fi
tar -C "$rootfs" -c . | podman import "${changes[@]}" - docker.io/library/debian:bookworm-slim >/dev/null
echo "base image docker.io/library/debian:bookworm-slim made with debootstrap from $mirror"
