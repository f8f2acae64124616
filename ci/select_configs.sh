#!/usr/bin/env bash
# Which configs the smoke job trains, one path per line into OUT_FILE.
# Usage: ci/select_configs.sh OUT_FILE
# With BASE_SHA set (a pull request): the configs/*.yaml files the PR adds or changes since BASE_SHA.
# Without it (pushes to main, local runs): every config in configs/. An empty list means the smoke
# job runs the built-in example. Writes count=<n> to $GITHUB_OUTPUT when set.
set -euo pipefail
out="${1:?usage: ci/select_configs.sh OUT_FILE}"
mkdir -p "$(dirname "$out")"
if [ -n "${BASE_SHA:-}" ]; then
  git diff --name-only --diff-filter=d "$BASE_SHA" HEAD -- 'configs/*.yaml' 'configs/*.yml' >"$out"
else
  find configs -maxdepth 1 -type f \( -name '*.yaml' -o -name '*.yml' \) 2>/dev/null | sort >"$out"
fi
count=$(grep -c . "$out" || true)
echo "configs to smoke-train: $count"
sed 's/^/  /' "$out"
if [ -n "${GITHUB_OUTPUT:-}" ]; then
  echo "count=$count" >>"$GITHUB_OUTPUT"
fi
