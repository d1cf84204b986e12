#!/bin/sh
# Installs what the browser test (pytest -m browser) needs on a fresh Debian machine; run as root.
# --no-install-recommends keeps it near 30 packages / ~420 MB instead of 116 / ~505 MB;
# fonts-liberation was one of the recommends and text renders as boxes without a font.
set -eu

if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
    echo "browser-deps: chromium and chromedriver already installed"
    exit 0
fi

export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends chromium chromium-driver fonts-liberation
/usr/bin/chromium --version
/usr/bin/chromedriver --version
