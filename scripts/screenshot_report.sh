#!/usr/bin/env bash
# A headless-Chromium screenshot of a pipeline's report.html, to look at it as a browser shows it:
#
#   bash scripts/screenshot_report.sh runs/pipeline_tiny [OUT.png] [WIDTHxHEIGHT]
#
# Writes RUN_DIR/report.png (1400x3000 unless given). Installs Debian's chromium with apt-get if no
# chromium/chromium-browser/google-chrome is on PATH (as root). The flags keep Chromium off the network
# (no background updates, sync or QUIC: the report is self-contained, its images are data: URIs).
set -euo pipefail
run_dir=${1:?usage: screenshot_report.sh RUN_DIR [OUT.png] [WIDTHxHEIGHT]}
[ -f "$run_dir/report.html" ] || { echo "error: no $run_dir/report.html (rl report $run_dir writes it)" >&2; exit 2; }
html=$(realpath "$run_dir/report.html")
out=$(realpath -m "${2:-$run_dir/report.png}")
size=${3:-1400x3000}
browser=$(command -v chromium || command -v chromium-browser || command -v google-chrome || true)
if [ -z "$browser" ]; then
  echo "installing Debian's chromium (apt-get)" >&2
  apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null
  browser=$(command -v chromium)
fi
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
timeout 120 "$browser" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
  --disable-background-networking --disable-component-update --disable-sync --hide-scrollbars \
  --user-data-dir="$profile" --window-size="${size/x/,}" --screenshot="$out" "file://$html" 2>/dev/null
[ -s "$out" ] || { echo "error: chromium wrote no screenshot to $out" >&2; exit 1; }
echo "$out"
