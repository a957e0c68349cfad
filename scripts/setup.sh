#!/usr/bin/env bash
# Sets up everything vitlab needs on a fresh Debian machine: the Fashion-MNIST data package (when running as root with
# apt) and a virtual environment in .venv with vitlab and its dependencies. With --dev it also installs the development
# tools and every optional extra (the test suite's needs) and Debian's chromium, which the HTML-report screenshot test
# uses. Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

debs=()
[ -f /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz ] || debs+=(dataset-fashion-mnist)
if [ "${1:-}" = "--dev" ] && ! command -v chromium >/dev/null; then debs+=(chromium); fi
if [ ${#debs[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${debs[*]}" >&2
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${debs[@]}" >/dev/null
  else
    echo "setup: warning: not root with apt-get; install these Debian packages yourself: ${debs[*]}" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
# the main job needs only vitlab's own dependencies (about half the install time of the development tools)
extras=""
stamp=.venv/.vitlab-installed
imports="vitlab, torch"
if [ "${1:-}" = "--dev" ]; then
  extras="[dev]"
  stamp=.venv/.vitlab-installed-dev
  imports="$imports, timm"
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ constraints.txt -nt "$stamp" ]; then
  echo "setup: installing vitlab${extras} into .venv (first run takes a minute or more)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e ".${extras}" 2>&1 \
    | grep -v "is ignored: it is neither a file nor a directory" >&2 || true
  .venv/bin/python -c "import $imports" # fail here, not later, if the install did not work
  touch "$stamp"
fi
