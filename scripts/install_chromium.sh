#!/usr/bin/env bash
# Install Debian's chromium for the browser tests where we can (root + apt); otherwise say why
# the browser tests will be skipped. Never fails the build.
set -u
if command -v chromium >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" != "0" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "note: chromium not installed and cannot install it here (needs root and apt-get):" \
         "browser tests will be skipped" >&2
    exit 0
fi
echo "installing Debian's chromium for the browser tests ..." >&2
export DEBIAN_FRONTEND=noninteractive
if ! (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core) \
        >/tmp/istr_viz_chromium_install.log 2>&1; then
    echo "note: apt-get could not install chromium (see /tmp/istr_viz_chromium_install.log):" \
         "browser tests will be skipped" >&2
fi
exit 0
