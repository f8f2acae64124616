#!/usr/bin/env bash
# Attach a finished run's weights, loss plot, loss log and summary to the GitHub release TAG
# (gh release upload --clobber, so a re-run replaces rather than duplicates). Skips with a notice
# when no release TAG exists (a manual run). Needs GH_TOKEN with contents: write.
# Usage: ci/release_upload.sh TAG OUTPUT_DIR
set -euo pipefail
tag="${1:?usage: ci/release_upload.sh TAG OUTPUT_DIR}"
out="${2:?usage: ci/release_upload.sh TAG OUTPUT_DIR}"
if ! gh release view "$tag" >/dev/null 2>&1; then
  echo "::notice::no GitHub release named $tag; nothing attached"
  exit 0
fi
files=()
for name in pytorch_lora_weights.safetensors lora_weights.safetensors adapter_model.safetensors \
            adapter_config.json loss.png training_summary.json logs/loss.csv; do
  [ -f "$out/$name" ] && files+=("$out/$name")
done
if [ "${#files[@]}" -eq 0 ]; then
  echo "no weight files in $out" >&2
  exit 1
fi
gh release upload "$tag" "${files[@]}" --clobber
echo "attached ${#files[@]} file(s) to release $tag"
