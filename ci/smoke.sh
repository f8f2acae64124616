#!/usr/bin/env bash
# Smoke-train every config listed in LIST_FILE (one path per line) on the mock base models,
# sharing WORK_DIR so the mock models and dummy data are built once. An empty list runs the
# built-in example. Each run's outputs land in WORK_DIR/output/<config name>/. Every config is
# tried even when one fails; the exit status is non-zero if any failed.
# Usage: ci/smoke.sh WORK_DIR LIST_FILE [STEPS]
set -euo pipefail
work="${1:?usage: ci/smoke.sh WORK_DIR LIST_FILE [STEPS]}"
list="${2:?usage: ci/smoke.sh WORK_DIR LIST_FILE [STEPS]}"
steps="${3:-5}"
mkdir -p "$work"
mapfile -t configs < <(grep . "$list" || true)
failed=()
if [ "${#configs[@]}" -eq 0 ]; then
  echo "no configs selected: smoke-training the built-in example"
  lora-scripts smoke --work-dir "$work" --steps "$steps" || failed+=("built-in example")
fi
for config in "${configs[@]}"; do
  echo "::group::smoke $config"
  lora-scripts smoke --config "$config" --work-dir "$work" --steps "$steps" || failed+=("$config")
  echo "::endgroup::"
done
if [ "${#failed[@]}" -gt 0 ]; then
  printf 'smoke failed for: %s\n' "${failed[@]}" >&2
  exit 1
fi
echo "smoke passed for ${#configs[@]} config(s)"
