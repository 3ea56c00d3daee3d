#!/usr/bin/env bash
# Tools the deployment checks in `make test` use, from Debian's packages when missing:
# docker-compose (validates docker-compose.yml without a Docker engine) and promtool (alert rules).
set -euo pipefail
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v promtool >/dev/null || missing+=(prometheus)
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -eq 0 ]; then sudo=""; elif command -v sudo >/dev/null; then sudo=sudo; else
  echo "[tools] error: need root to apt-get install ${missing[*]}" >&2; exit 1
fi
echo "[tools] installing ${missing[*]} with apt"
$sudo apt-get update -qq
$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
