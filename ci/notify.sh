#!/usr/bin/env bash
# Report a pipeline result: always to the log, and as JSON to $NOTIFY_WEBHOOK_URL when set
# (Slack/Teams/Mattermost-style incoming webhooks take {"text": ...}).
# Usage: ci/notify.sh success|failure MESSAGE
set -euo pipefail
status="${1:?usage: ci/notify.sh success|failure MESSAGE}"
message="${2:-}"
text="lora-scripts: $status${message:+ - $message}"
echo "$text"
if [ -n "${NOTIFY_WEBHOOK_URL:-}" ]; then
  payload=$(python3 -c 'import json, sys; print(json.dumps({"text": sys.argv[1]}))' "$text")
  curl --fail --silent --show-error --max-time 20 -H 'Content-Type: application/json' \
    -d "$payload" "$NOTIFY_WEBHOOK_URL" >/dev/null || echo "warning: notification webhook failed" >&2
fi
