#!/bin/sh
# One-shot loader: waits (bounded) for each tenant's HAPI FHIR server, then sends that tenant's transaction
# Bundle to it. The Bundles PUT fixed ids, so running the loader again changes nothing.
set -eu

TRIES=150      # 150 x 2 s = 5 minutes per server at most (HAPI needs a minute or two to start)

load() {
  name=$1 base=$2 bundle=$3
  i=0
  until curl -fsS -o /dev/null "$base/metadata" 2>/dev/null; do
    i=$((i + 1))
    if [ "$i" -ge "$TRIES" ]; then
      echo "loader: $name did not answer $base/metadata within $((TRIES * 2)) s" >&2
      exit 1
    fi
    sleep 2
  done
  curl -fsS -o /dev/null -X POST -H 'Content-Type: application/fhir+json' --data-binary "@$bundle" "$base"
  echo "loader: $(basename "$bundle") -> $name"
}

load hapi-a http://hapi-a:8080/fhir /loader/tenant-a.json
load hapi-b http://hapi-b:8080/fhir /loader/tenant-b.json
echo "loader: done"
