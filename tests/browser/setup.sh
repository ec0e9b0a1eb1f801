#!/usr/bin/env bash
# Installs what the browser tests need, idempotently: Debian's Chromium (the
# tests drive it through playwright-core; no browser is ever downloaded by
# npm) and the locked npm packages. Safe to run again: it only touches what is
# missing.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v chromium >/dev/null 2>&1; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  # Refresh the package lists only when they are absent (a fresh image).
  if [ -z "$(ls -A /var/lib/apt/lists 2>/dev/null | grep -v -e lock -e partial)" ]; then
    $sudo apt-get update
  fi
  install() { $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium fonts-dejavu-core; }
  # Stale lists can name packages the mirror no longer has: refresh and retry once.
  install || { $sudo apt-get update && install; }
fi
chromium --version

if [ ! -d node_modules/playwright-core ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  # Never `npx playwright install`: the browser is Debian's.
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund
fi
