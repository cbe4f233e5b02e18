#!/usr/bin/env bash
# Lets `pip install -e .` compile the rustbpe crate where crates.io cannot be reached.
#
# crates.io answers  -> nothing to do (and an offline config written earlier by this script is removed).
# crates.io silent   -> Debian's source crates (librust-*-dev; installed here when running as root, else the
#                       apt command is printed and the script stops) provide exactly the
#                       versions pinned in rustbpe/Cargo.toml under /usr/share/cargo/registry, and a git-ignored
#                       .cargo/config.toml at the repository root (cargo reads it: pip runs the build from there)
#                       replaces crates-io with that directory and switches cargo to offline mode.
# rustbpe/Cargo.lock is generated and git-ignored: Debian's crate sources carry no (or different) checksums than
# crates.io, so one committed lock file cannot serve both sources; the direct dependencies are pinned with `=`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CONFIG="$ROOT/.cargo/config.toml"
LOCK="$ROOT/rustbpe/Cargo.lock"
MARK="# written by rustbpe/offline.sh"
REGISTRY=/usr/share/cargo/registry
PACKAGES="librust-pyo3-dev librust-rayon-dev librust-fancy-regex-dev librust-ahash-dev librust-regex-syntax-dev"
CRATES="pyo3-0.17.3 rayon-1.6.1 fancy-regex-0.7.1 ahash-0.7.6 regex-syntax-0.6.27"

ours() { [ -f "$CONFIG" ] && head -n 1 "$CONFIG" | grep -qF "$MARK"; }

# apt_install WHY PACKAGE...: as root, install with apt; otherwise never sudo: print the one command and stop.
apt_install() {
  local why="$1"; shift
  if [ "$(id -u)" -ne 0 ]; then
    echo "rustbpe/offline.sh: $why. Install it, then run make again:" >&2
    echo "    sudo apt-get install -y $*" >&2
    exit 1
  fi
  apt-get install -y -q "$@" || { apt-get update -q && apt-get install -y -q "$@"; }
}

# maturin needs cargo on PATH (rustup's, or Debian's cargo/rustc packages)
if ! command -v cargo >/dev/null 2>&1; then
  if [ -x "$HOME/.cargo/bin/cargo" ]; then
    echo "rustbpe/offline.sh: cargo is in ~/.cargo/bin but not on PATH: export PATH=\$HOME/.cargo/bin:\$PATH" >&2
    exit 1
  fi
  apt_install "no Rust toolchain found (or install Rust from https://rustup.rs)" cargo rustc \
    || { echo "rustbpe/offline.sh: could not install cargo; install Rust (https://rustup.rs) and retry" >&2; exit 1; }
fi

if curl -sf -m 5 https://index.crates.io/config.json >/dev/null 2>&1; then
  if ours; then
    echo "rustbpe/offline.sh: crates.io reachable again; removing the offline cargo config"
    rm -f "$CONFIG" "$LOCK"   # the lock was resolved against Debian's sources
    rmdir "$(dirname "$CONFIG")" 2>/dev/null || true
  fi
  exit 0
fi

missing=""
for c in $CRATES; do [ -d "$REGISTRY/$c" ] || missing="$missing $c"; done
if [ -n "$missing" ]; then
  if ! apt_install "crates.io is unreachable and Debian's source crates$missing are missing" $PACKAGES; then
    echo "rustbpe/offline.sh: could not install $PACKAGES (needs Debian 12 'bookworm' sources)" >&2; exit 1
  fi
  for c in $CRATES; do
    [ -d "$REGISTRY/$c" ] || { echo "rustbpe/offline.sh: $REGISTRY/$c still missing (other Debian release?)" >&2; exit 1; }
  done
fi

if ! ours; then
  [ -e "$CONFIG" ] && { echo "rustbpe/offline.sh: $CONFIG exists and is not ours; leaving it alone" >&2; exit 0; }
  rm -f "$LOCK"   # a lock resolved against crates.io would not match Debian's sources
  mkdir -p "$(dirname "$CONFIG")"
  cat > "$CONFIG" <<CFG
$MARK (crates.io unreachable: build rustbpe from Debian's source crates)
[source.crates-io]
replace-with = "debian"

[source.debian]
directory = "$REGISTRY"

[net]
offline = true
CFG
  echo "rustbpe/offline.sh: crates.io unreachable; cargo will use $REGISTRY ($CONFIG)"
fi
