#!/usr/bin/env bash
# Renders every kustomization under deploy/k8s (the overlays and the submit Jobs) and validates
# the result offline: Kubernetes objects against the Kubernetes OpenAPI schemas
# (kubernetes-validate, strict: unknown fields are errors), custom resources against the
# schemas in deploy/k8s/schemas/ (KEDA's ScaledObject). A kind with neither is an error.
# Needs kubectl (or kustomize) and python3 with kubernetes-validate (.ci/run installs them).
set -euo pipefail
cd "$(dirname "$0")"
K8S_VERSION="${K8S_VERSION:-1.31}"
render() {
  if command -v kubectl >/dev/null; then kubectl kustomize "$1"; else kustomize build "$1"; fi
}
out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT
for dir in overlays/dev overlays/prod overlays/prod/submit submit; do
  f="$out/$(echo "$dir" | tr / _).yaml"
  render "$dir" > "$f"
  echo "== $dir: $(grep -c '^kind:' "$f") objects"
  python3 - "$f" "$K8S_VERSION" schemas <<'PY'
import json, os, sys
import yaml, jsonschema
import kubernetes_validate as kv

path, version, schemas = sys.argv[1], sys.argv[2], sys.argv[3]
failed = False
with open(path) as fh:
    docs = [d for d in yaml.safe_load_all(fh) if d]
for d in docs:
    what = f"{d.get('kind')}/{d.get('metadata', {}).get('name')}"
    group = d.get("apiVersion", "")
    custom = os.path.join(schemas, f"{group.replace('/', '_')}_{d.get('kind', '').lower()}.json")
    if "." in group.split("/")[0] and os.path.exists(custom):
        with open(custom) as fh:
            schema = json.load(fh)
        errors = list(jsonschema.Draft202012Validator(schema).iter_errors(d))
        for e in errors:
            print(f"  FAIL {what}: {'/'.join(map(str, e.path))}: {e.message}")
        failed |= bool(errors)
        if not errors:
            print(f"  ok   {what} ({os.path.basename(custom)})")
        continue
    try:
        kv.validate(d, version, strict=True)
        print(f"  ok   {what}")
    except kv.ValidationError as e:
        print(f"  FAIL {what}: {'/'.join(map(str, e.path))}: {e.message}")
        failed = True
    except (kv.SchemaNotFoundError, kv.InvalidSchemaError) as e:
        print(f"  FAIL {what}: no schema for {group} {d.get('kind')}: add one to deploy/k8s/schemas/ ({e})")
        failed = True
sys.exit(1 if failed else 0)
PY
done
echo "== all manifests render and validate (Kubernetes $K8S_VERSION)"
