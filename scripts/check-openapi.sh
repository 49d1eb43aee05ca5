#!/usr/bin/env bash
# Validates openapi/openapi.json as OpenAPI 3.1 with openapi-spec-validator (a PyPI package, in the
# tests' virtualenv from scripts/venv.sh). Skips with a note where Python's venv module is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! venv=$(bash scripts/venv.sh); then
  echo "openapi: python3 venv unavailable; schema validation skipped (drift check still ran)"
  exit 0
fi
"$venv/bin/python" - <<'PY'
import json
from openapi_spec_validator import validate
doc = json.load(open("openapi/openapi.json"))
validate(doc)
print(f"openapi: valid OpenAPI {doc['openapi']}, {len(doc['paths'])} paths")
PY
