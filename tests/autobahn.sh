#!/usr/bin/env bash
# The Autobahn|Testsuite check (tests/autobahn.rs): `wstest` from PyPI's
# autobahntestsuite, which needs Python 2.7.
#
#   tests/autobahn.sh install   # pip-install it into target/autobahn/py
#   tests/autobahn.sh run       # install if needed, then run the test
#   tests/autobahn.sh python    # the Python 2.7 it uses
#
# Python: $AUTOBAHN_PYTHON, else pyenv's 2.7.18 (`pyenv install 2.7.18`
# when pyenv lacks it and can build it), else python2.7 on PATH.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
site="${AUTOBAHN_PY:-$PWD/target/autobahn/py}"

python27() {
    if [ -n "${AUTOBAHN_PYTHON:-}" ]; then
        echo "$AUTOBAHN_PYTHON"
        return
    fi
    if command -v pyenv >/dev/null 2>&1; then
        if ! pyenv versions --bare | grep -qx 2.7.18; then
            pyenv install -s 2.7.18 >&2
        fi
        echo "$(pyenv root)/versions/2.7.18/bin/python"
        return
    fi
    command -v python2.7 || { echo "no Python 2.7 (set AUTOBAHN_PYTHON)" >&2; exit 1; }
}

install() {
    if [ -d "$site/autobahntestsuite" ]; then
        echo "autobahntestsuite already in $site"
        return
    fi
    local py
    py="$(python27)"
    mkdir -p "$site"
    # A private --target dir: nothing is added to that Python's own packages.
    "$py" -m pip install --disable-pip-version-check --no-warn-script-location \
        --target "$site" autobahntestsuite
}

case "${1:-run}" in
    install) install ;;
    python) python27 ;;
    run)
        install
        AUTOBAHN_PY="$site" AUTOBAHN_PYTHON="$(python27)" \
            cargo test --test autobahn -- --nocapture
        ;;
    *) echo "usage: $0 [install|run]" >&2; exit 2 ;;
esac
