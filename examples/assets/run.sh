#!/usr/bin/env bash
# Assets mode end to end in a temporary folder: publish v1 of a site, let
# dewy place it, publish v2, watch `current` switch. Needs a built dewy
# (cargo build -p dewy-cli) and curl.
set -euo pipefail
DEWY=${DEWY:-$(cd "$(dirname "$0")/../.." && pwd)/target/debug/dewy}
WORK=$(mktemp -d)
trap 'kill "$PID" 2>/dev/null || true; rm -rf "$WORK"' EXIT
publish() {
  mkdir -p "$WORK/build" "$WORK/releases/$1"
  echo "<h1>site $1</h1>" > "$WORK/build/index.html"
  tar -C "$WORK/build" -czf "$WORK/releases/$1/.site.tmp" .
  mv "$WORK/releases/$1/.site.tmp" "$WORK/releases/$1/site.tar.gz"
}
publish v1.0.0
mkdir -p "$WORK/www" && cd "$WORK/www"
"$DEWY" assets --registry "file://$WORK/releases?artifact=site.tar.gz" --interval 1 \
  --after-deploy-hook 'echo "deployed $DEWY_VERSION into $DEWY_RELEASE_DIR"' &
PID=$!
sleep 3; cat current/index.html
publish v1.1.0
sleep 3; cat current/index.html
kill -TERM "$PID"; wait "$PID"
