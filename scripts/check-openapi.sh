#!/usr/bin/env bash
# Validates openapi/openapi.json as OpenAPI 3.1 with openapi-spec-validator (a PyPI package, kept in
# a virtualenv under target/). Skips with a note where Python's venv module is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=target/.openapi-validator
if [ ! -x "$venv/bin/python" ]; then
  if ! python3 -m venv "$venv" >/dev/null 2>&1; then
    echo "openapi: python3 venv unavailable; schema validation skipped (drift check still ran)"
    exit 0
  fi
  "$venv/bin/pip" install --quiet --disable-pip-version-check openapi-spec-validator
fi
"$venv/bin/python" - <<'PY'
import json
from openapi_spec_validator import validate
doc = json.load(open("openapi/openapi.json"))
validate(doc)
print(f"openapi: valid OpenAPI {doc['openapi']}, {len(doc['paths'])} paths")
PY
