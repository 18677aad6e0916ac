#!/usr/bin/env bash
# Refresh the browser libraries vendored in static/vendor (the page must work offline: no CDN).
set -euo pipefail
SOCKET_IO=4.8.4
UPLOT=1.6.32
dest="$(cd "$(dirname "$0")/.." && pwd)/static/vendor"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm init -y >/dev/null && npm install --silent "socket.io-client@$SOCKET_IO" "uplot@$UPLOT")
cp "$tmp/node_modules/socket.io-client/dist/socket.io.min.js" "$dest/"
cp "$tmp/node_modules/uplot/dist/uPlot.iife.min.js" "$tmp/node_modules/uplot/dist/uPlot.min.css" "$dest/"
cp "$tmp/node_modules/uplot/LICENSE" "$dest/LICENSE.uplot"
cp "$tmp/node_modules/socket.io-client/LICENSE" "$dest/LICENSE.socket.io-client"
echo "socket.io-client $SOCKET_IO, uPlot $UPLOT" > "$dest/VERSIONS"
