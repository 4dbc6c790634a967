#!/usr/bin/env bash
# Build a minimoe image: `docker/build.sh cpu` -> minimoe:cpu, `docker/build.sh gpu` -> minimoe:gpu.
# Uses docker when its daemon answers, else podman (daemonless; chroot isolation needs no cgroups).
# Extra arguments go to the build command. CONTAINER_ENGINE=docker|podman overrides the choice.
set -euo pipefail
cd "$(dirname "$0")/.."
kind=${1:?usage: docker/build.sh cpu|gpu [build flags]}
shift
case "$kind" in
  cpu) file=docker/Dockerfile.cpu ;;
  gpu) file=docker/Dockerfile ;;
  *) echo "error: image kind '$kind' is invalid: allowed cpu, gpu" >&2; exit 2 ;;
esac
engine=${CONTAINER_ENGINE:-$(docker info >/dev/null 2>&1 && echo docker || echo podman)}
args=(-f "$file" -t "minimoe:$kind")
if [ "$engine" = podman ]; then
  args+=(--isolation=chroot --network=host)
  # Where this host's pip finds wheels on local disk (`pip config`: find-links and file:// indexes), the
  # build uses them instead of the remote CPU index: mounted read-only, named in build arguments. Docker
  # builds have no volumes; they take the index named in the Dockerfile.
  pip=$(command -v pip3 || command -v pip || true)
  links=$([ -n "$pip" ] && "$pip" config get global.find-links 2>/dev/null || true)
  indexes=$([ -n "$pip" ] && "$pip" config get global.extra-index-url 2>/dev/null || true)
  if [ -n "$links" ] && [ "$kind" = cpu ]; then
    local_indexes=""
    for url in $indexes; do
      case "$url" in file://*) local_indexes="$local_indexes $url"; dir=${url#file://}
        args+=(-v "$(dirname "$dir"):$(dirname "$dir"):ro") ;; esac
    done
    for dir in $links; do args+=(-v "$dir:$dir:ro"); done
    args+=(--build-arg "PIP_FIND_LINKS=$links" --build-arg "PIP_EXTRA_INDEX_URL=${local_indexes# }")
  fi
fi
start=$(date +%s)
"$engine" build "${args[@]}" "$@" .
echo "minimoe:$kind built with $engine in $(( $(date +%s) - start )) s;" \
  "size $("$engine" image inspect "minimoe:$kind" --format '{{.Size}}' | awk '{printf "%.2f GB", $1 / 1e9}')"
