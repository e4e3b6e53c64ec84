#!/usr/bin/env bash
# Installs Debian's chromium and chromium-driver for the HTML report's browser test
# (tests/report/test_report.py), when they are missing and this user may install packages.
# Best effort: without them that one test skips, saying why; nothing else needs a browser.
set -uo pipefail

if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
if [ "$(id -u)" = 0 ]; then
  sudo=""
elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
  sudo="sudo -n"
else
  echo "[install_browser] not root and no sudo: the report's browser test will skip" >&2
  exit 0
fi
export DEBIAN_FRONTEND=noninteractive
echo "[install_browser] installing chromium and chromium-driver (Debian packages)"
if ! $sudo apt-get install -y -q chromium chromium-driver >/tmp/retina_d2_apt.log 2>&1; then
  # A machine whose package lists are stale or absent: refresh them once and retry.
  $sudo apt-get update -q >>/tmp/retina_d2_apt.log 2>&1
  $sudo apt-get install -y -q chromium chromium-driver >>/tmp/retina_d2_apt.log 2>&1 || {
    echo "[install_browser] apt-get failed (log: /tmp/retina_d2_apt.log): the browser test will skip" >&2
  }
fi
exit 0
