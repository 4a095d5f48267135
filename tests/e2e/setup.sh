#!/usr/bin/env bash
# What the browser tests need, installed only when missing (idempotent,
# quick when everything is present). Used by .ci/run; by hand too.
#
#   tests/e2e/setup.sh node        # Node.js and npm (Debian's nodejs, npm)
#   tests/e2e/setup.sh chromium    # Debian's chromium (/usr/bin/chromium)
#   tests/e2e/setup.sh playwright  # node, then playwright-core into target/e2e
#   tests/e2e/setup.sh all         # all three
#   tests/e2e/setup.sh dir         # print the playwright-core directory
#
# No browser is ever downloaded: playwright-core ships none, and the tests
# launch Debian's /usr/bin/chromium through `executablePath`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

PLAYWRIGHT_CORE_VERSION=1.65.2
dir="${PLAYWRIGHT_DIR:-$PWD/target/e2e}"

as_root() {
    if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

apt_updated=
apt_install() {
    if [ -z "$apt_updated" ]; then
        as_root apt-get update
        apt_updated=1
    fi
    as_root env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "$@"
}

need_node() {
    if ! command -v node >/dev/null 2>&1; then
        echo "installing Debian's nodejs"
        apt_install nodejs
    fi
    # Some nodejs builds bring npm along; only then is Debian's npm needed.
    if ! command -v npm >/dev/null 2>&1; then
        echo "installing Debian's npm"
        apt_install npm
    fi
    echo "node $(command node --version), npm $(npm --version)"
}

need_chromium() {
    if [ ! -x /usr/bin/chromium ]; then
        echo "installing Debian's chromium"
        apt_install chromium
    fi
    # The Debian wrapper prints a harmless shell warning on some hosts.
    /usr/bin/chromium --version 2>/dev/null
}

need_playwright() {
    need_node
    if [ -f "$dir/node_modules/playwright-core/package.json" ] &&
        grep -q "\"version\": \"$PLAYWRIGHT_CORE_VERSION\"" \
            "$dir/node_modules/playwright-core/package.json"; then
        echo "playwright-core $PLAYWRIGHT_CORE_VERSION already in $dir"
        return
    fi
    mkdir -p "$dir"
    [ -f "$dir/package.json" ] || printf '{"private": true}\n' >"$dir/package.json"
    (cd "$dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --no-audit --no-fund --save-exact \
        "playwright-core@$PLAYWRIGHT_CORE_VERSION")
}

case "${1:-all}" in
    node) need_node ;;
    chromium) need_chromium ;;
    playwright) need_playwright ;;
    all)
        need_chromium
        need_playwright
        ;;
    dir) echo "$dir" ;;
    *)
        echo "usage: $0 [node|chromium|playwright|all|dir]" >&2
        exit 2
        ;;
esac
