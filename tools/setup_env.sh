#!/usr/bin/env bash
# Builds (or reuses) the Python environment of this checkout and exposes it as ./.venv.
#
# The heavy part (torch, torchvision, Detectron2 and the rest of requirements.lock) lives in
# ${RETINA_D2_CACHE:-~/.cache/retina_d2}/env-<hash>, keyed by a hash of the lock file, this script
# and the interpreter version, so a second checkout or a second run costs seconds. ./.venv is a
# small venv of its own whose site-packages chains to the cached one, with this checkout
# installed in it by `pip install -e .` (the shared environment is never touched).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$here"
python="${RETINA_D2_PYTHON:-python3}"
cache="${RETINA_D2_CACHE:-$HOME/.cache/retina_d2}"
lock="requirements.lock"

# Detectron2 is not on PyPI under its own name; this sdist holds v0.6's Python sources.
d2_sdist="pb1-detectron2==0.6"
d2_sha256="5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"

# An upstream Detectron2 (built with its C++ extension) on the base interpreter wins over the sdist.
upstream_d2=0
if "$python" -c "import detectron2, detectron2._C" >/dev/null 2>&1; then
  upstream_d2=1
fi

pyver="$("$python" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
nodeps="requirements-nodeps.txt"
key="$( (cat "$lock" "$nodeps" "$0"; echo "$pyver $upstream_d2") | sha256sum | cut -c1-16)"
env="$cache/env-$key"
mkdir -p "$cache"

build_env() {
  local tmp="$env.tmp-$$"
  rm -rf "$tmp"
  echo "[setup_env] building $env (takes a few minutes once; later runs reuse it)"
  if [ "$upstream_d2" = 1 ]; then
    "$python" -m venv --system-site-packages "$tmp"
  else
    "$python" -m venv "$tmp"
  fi
  # pip >= 24 refuses the Detectron2 sdist's metadata (an extra names a direct URL), so the env
  # keeps the pip that Python 3.11 bundles, pinned so that a newer bundled pip changes nothing.
  "$tmp/bin/python" -m pip install -q pip==23.2.1 2> >(grep -v '^WARNING: Location' >&2)
  # Some machines point pip at local mirror folders that do not all exist; drop that noise only.
  "$tmp/bin/python" -m pip install -q -r "$lock" 2> >(grep -v '^WARNING: Location' >&2)
  "$tmp/bin/python" -m pip install -q --no-deps -r "$nodeps" 2> >(grep -v '^WARNING: Location' >&2)
  if [ "$upstream_d2" = 0 ]; then
    local dl="$cache/downloads"
    mkdir -p "$dl"
    local archive="$dl/pb1-detectron2-0.6.tar.gz"
    if [ ! -f "$archive" ] || ! echo "$d2_sha256  $archive" | sha256sum -c --quiet - 2>/dev/null; then
      rm -f "$archive"
      # The sdist's setup.py imports torch, so metadata preparation needs this env (no isolation).
      "$tmp/bin/python" -m pip download -q --no-deps --no-build-isolation --no-binary :all: \
        "$d2_sdist" -d "$dl" 2> >(grep -v '^WARNING: Location' >&2)
    fi
    echo "$d2_sha256  $archive" | sha256sum -c --quiet - || {
      echo "[setup_env] $archive does not have the pinned sha256 $d2_sha256" >&2
      exit 1
    }
    local site
    site="$("$tmp/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    # Only the pure-Python package: the sdist lacks the C++ sources of detectron2._C, whose
    # absence retina_d2/compat.py handles.
    tar -xzf "$archive" -C "$site" --strip-components=1 pb1-detectron2-0.6/detectron2
  fi
  touch "$tmp/.complete"
  rm -rf "$env"
  mv "$tmp" "$env"
}

if [ ! -f "$env/.complete" ]; then
  # One builder at a time per cache; a second caller waits and then reuses the result.
  exec 9>"$cache/.lock"
  flock 9
  [ -f "$env/.complete" ] || build_env
  flock -u 9
fi

# A per-checkout venv chained to the cached environment and to this checkout.
if [ ! -x .venv/bin/python ] || [ ! -f .venv/.retina_d2_env ] || \
   [ "$(cat .venv/.retina_d2_env)" != "$env" ]; then
  rm -rf .venv
  "$python" -m venv --without-pip .venv
  site="$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  env_site="$("$env/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "import site; site.addsitedir('$env_site')" > "$site/retina_d2_env.pth"
  # The checkout itself, as `pip install -e .` installs it: importable, and the `retina-d2`
  # command in .venv/bin. Offline: no dependencies (the cached env has them), no build isolation.
  .venv/bin/python -m pip install -q --no-deps --no-build-isolation --no-index -e . \
    2> >(grep -v '^WARNING: Location' >&2)
  printf '#!/bin/sh\nexec "%s" -m pytest "$@"\n' "$here/.venv/bin/python" > .venv/bin/pytest
  chmod +x .venv/bin/pytest
  echo "$env" > .venv/.retina_d2_env
fi
echo "[setup_env] .venv -> $env"
