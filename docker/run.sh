#!/usr/bin/env bash
# Run a command in a minimoe image: `docker/run.sh IMAGE CMD...` (docker, or podman without a daemon).
# Shared memory: gloo and DeepSpeed's CPU ops use /dev/shm, which a container's 64 MB default cannot hold.
set -euo pipefail
image=${1:?usage: docker/run.sh IMAGE CMD...}
shift
engine=${CONTAINER_ENGINE:-$(docker info >/dev/null 2>&1 && echo docker || echo podman)}
args=(--rm --shm-size=2g --network=host)
if [ "$engine" = podman ]; then
  # runc, not crun (which needs cgroup controllers some hosts do not delegate); ulimits a user can hold.
  args+=(--runtime runc --ulimit nofile=20000:20000 --ulimit nproc=32768:32768)
fi
exec "$engine" run "${args[@]}" "$image" "$@"
