#!/bin/sh
# Wait for the sidecar's rendering of haproxy.cfg (shared volume), then become HAProxy in master-worker mode.
set -eu
CONFIG="${HAPROXY_CONFIG:-/run/ddb-sidecar/haproxy.cfg}"
MASTER="${HAPROXY_MASTER_SOCKET:-/run/ddb-sidecar/haproxy-master.sock}"
WAIT="${HAPROXY_CONFIG_WAIT:-120}"
waited=0
while [ ! -s "$CONFIG" ]; do
  if [ "$waited" -ge "$WAIT" ]; then
    echo "ddb-sidecar-haproxy: no $CONFIG after ${WAIT}s; is the sidecar container running (it renders it)?" >&2
    exit 1
  fi
  waited=$((waited + 1))
  sleep 1
done
exec haproxy -W -S "$MASTER,mode,600" -f "$CONFIG" "$@"
