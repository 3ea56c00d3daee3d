#!/usr/bin/env bash
# Container images of ThrottleX, built on this machine (`make image`).
#
#   deploy/local/image.sh build      the ThrottleX image (deploy/Dockerfile), tagged throttlex:local
#   deploy/local/image.sh services   Redis and Kafka images from Debian's packages and the Kafka jars this
#                                    checkout resolves from Maven (for deploy/local/compose.yml)
#   deploy/local/image.sh engine     start a Docker engine if none answers (installs Debian's docker.io)
#   deploy/local/image.sh clean      remove the images built here
#
# The base image: THROTTLEX_IMAGE_BASE if set; else python:3.11-slim if a registry serves it; else a Debian
# bookworm root filesystem (Python 3.11 from Debian) built with mmdebstrap and imported as
# throttlex-base:bookworm: the only path that works where no registry can be reached.
#
# Settings (environment):
#   THROTTLEX_IMAGE        the tag to build (default: throttlex:local)
#   THROTTLEX_IMAGE_BASE   the base image (default: see above)
#   THROTTLEX_IMAGE_EXTRA_CA  PEM file(s), space separated, trusted while the build downloads packages (a proxy
#     that intercepts TLS); default: the host's own extra CAs, /usr/local/share/ca-certificates/*.crt.
#     Used by the build stage only: the image does not keep them.
set -euo pipefail

source "$(dirname "$0")/lib.sh"
state=${THROTTLEX_LOCAL_DIR:-$root/.throttlex/local}
image=${THROTTLEX_IMAGE:-throttlex:local}
debian_base=throttlex-base:bookworm
services_base=throttlex-services-base:bookworm

engine() {  # a Docker engine that answers, started (and installed) here if there is none
  docker info >/dev/null 2>&1 && return
  command -v dockerd >/dev/null || {
    say "installing Debian's docker.io (the Docker engine)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  }
  docker info >/dev/null 2>&1 && return  # the package's service started it
  mkdir -p "$state"
  say "starting dockerd (log: $state/dockerd.log)"
  as_root sh -c "nohup dockerd >'$state/dockerd.log' 2>&1 &"
  local deadline=$((SECONDS + ready_timeout_s))
  until docker info >/dev/null 2>&1; do
    [ $SECONDS -lt $deadline ] || { tail -n 20 "$state/dockerd.log" >&2; die "dockerd did not answer within ${ready_timeout_s}s"; }
    sleep 0.5
  done
}

debian_rootfs() {  # debian_rootfs <tag> <packages>: a bookworm root filesystem from Debian's packages, imported once
  docker image inspect "$1" >/dev/null 2>&1 && return
  command -v mmdebstrap >/dev/null || {
    say "installing mmdebstrap"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
  }
  mkdir -p "$state"
  local started=$SECONDS tar="$state/rootfs-$$.tar"
  mmdebstrap --quiet --variant=minbase --include="$2" bookworm "$tar" >"$state/mmdebstrap.log" 2>&1 \
    || { tail -n 20 "$state/mmdebstrap.log" >&2; rm -f "$tar"; die "mmdebstrap failed (log: $state/mmdebstrap.log)"; }
  docker import --change 'CMD ["/bin/bash"]' "$tar" "$1" >/dev/null
  rm -f "$tar"
  say "built $1 from Debian bookworm in $((SECONDS - started))s"
}

base_image() {  # the base to build on (see the header), printed
  if [ -n "${THROTTLEX_IMAGE_BASE:-}" ]; then echo "$THROTTLEX_IMAGE_BASE"; return; fi
  if docker image inspect python:3.11-slim >/dev/null 2>&1 || docker pull -q python:3.11-slim >/dev/null 2>&1; then
    echo python:3.11-slim; return
  fi
  say "no registry serves python:3.11-slim here: building the base from Debian bookworm with mmdebstrap (Python 3.11 from Debian)" >&2
  debian_rootfs "$debian_base" python3,python3-venv,ca-certificates >&2
  echo "$debian_base"
}

extra_ca() {  # the PEM text of the extra CAs to trust during the build (may be empty)
  local files=${THROTTLEX_IMAGE_EXTRA_CA:-$(ls /usr/local/share/ca-certificates/*.crt 2>/dev/null || true)}
  # shellcheck disable=SC2086  # a space-separated list of files
  [ -n "$files" ] && cat $files
  return 0
}

build() {
  engine
  local base started=$SECONDS
  base=$(base_image)
  say "building $image on $base"
  docker build -q -f "$root/deploy/Dockerfile" --build-arg BASE="$base" --build-arg EXTRA_CA="$(extra_ca)" \
    -t "$image" "$root" >/dev/null 2>"$state/image-build.log" \
    || { tail -n 40 "$state/image-build.log" >&2; die "building $image failed (log: $state/image-build.log)"; }
  # The build stage (the legacy builder leaves it) and the image this tag named before: untagged now.
  docker image prune -f --filter label=org.throttlex.stage >/dev/null
  say "built $image in $((SECONDS - started))s: $(docker image inspect -f '{{.Size}}' "$image" | awk '{printf "%.0f MB", $1 / 1e6}')"
}

services() {  # throttlex-redis:local and throttlex-kafka:local
  engine
  resolve_kafka
  debian_rootfs "$services_base" redis-server,openjdk-17-jre-headless,ca-certificates
  local context="$state/kafka-image"
  rm -rf "$context" && mkdir -p "$context/libs"
  cp "$libs"/*.jar "$context/libs/"
  cp "$here/images/kafka-entrypoint.sh" "$here/kafka-log4j.properties" "$context/"
  docker build -q -f "$here/images/kafka.Dockerfile" --build-arg BASE="$services_base" -t throttlex-kafka:local "$context" \
    >/dev/null 2>"$state/image-build.log" || { tail -n 40 "$state/image-build.log" >&2; die "building throttlex-kafka:local failed"; }
  docker build -q -f "$here/images/redis.Dockerfile" --build-arg BASE="$services_base" -t throttlex-redis:local "$here/images" \
    >/dev/null 2>"$state/image-build.log" || { tail -n 40 "$state/image-build.log" >&2; die "building throttlex-redis:local failed"; }
  rm -rf "$context"
  say "built throttlex-kafka:local and throttlex-redis:local on $services_base"
}

clean() {
  docker info >/dev/null 2>&1 || return 0
  docker image rm -f "$image" throttlex-kafka:local throttlex-redis:local >/dev/null 2>&1 || true
  say "removed $image and the service images (the Debian bases stay: docker image rm $debian_base $services_base)"
}

case "${1:-build}" in
  build) mkdir -p "$state"; build ;;
  services) mkdir -p "$state"; services ;;
  engine) engine ;;
  clean) clean ;;
  *) echo "usage: $0 build|services|engine|clean" >&2; exit 2 ;;
esac
