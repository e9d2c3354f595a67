#!/usr/bin/env bash
# Installs the Debian packages that the `tuxpaint`, `openclipart`, `real` and `real-sentences`
# datasets read (about 320 MB to download, 545 MB installed). Idempotent: does nothing when they
# are installed already. Needs root and apt-get; without them it says so and exits 0, and the
# tests that read these packages skip with the reason.
set -uo pipefail
pkgs=(tuxpaint-stamps-default openclipart-png openclipart-svg)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
  echo "datasets: ${pkgs[*]} already installed"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "datasets: apt-get not available; not installing ${missing[*]} (their tests skip)" >&2
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "datasets: not root; run: sudo apt-get install -y ${missing[*]} (their tests skip)" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
if apt-get update -q && apt-get install -y -q --no-install-recommends "${missing[@]}"; then
  echo "datasets: installed ${missing[*]}"
else
  echo "datasets: apt-get could not install ${missing[*]} (their tests skip)" >&2
fi
exit 0
