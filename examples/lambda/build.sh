#!/bin/sh
# Package the handler for template.yaml: only what it imports (boto3 comes with the Lambda runtime).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
rm -rf "$here/build"
mkdir -p "$here/build/sidecar/core" "$here/build/sidecar/replication"
touch "$here/build/sidecar/__init__.py"
cp "$repo/sidecar/core/__init__.py" "$repo/sidecar/core/replicate.py" "$here/build/sidecar/core/"
cp "$repo/sidecar/replication/__init__.py" "$repo/sidecar/replication/apply.py" \
   "$repo/sidecar/replication/lambda_handler.py" "$here/build/sidecar/replication/"
# Imports with nothing but the build folder and botocore: no other part of the sidecar sneaks in.
(cd "$here/build" && "${PYTHON:-python3}" -I -B -c "import sys; sys.path.insert(0, '.'); import sidecar.replication.lambda_handler")
rm -f "$here/replicator.zip"
(cd "$here/build" && "${PYTHON:-python3}" -m zipfile -c "$here/replicator.zip" sidecar)
echo "built $here/build (and replicator.zip for the aws CLI)"
