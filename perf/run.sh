#!/usr/bin/env bash
# Vespa's load benchmark: direct backend, nginx and Vespa side by side on 127.0.0.1.
# Usage: perf/run.sh [--quick] [--compare REF] [--scenarios S1,S3] ...  (bench.py --help)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null || ! command -v curl >/dev/null; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "perf: installing wrk, nginx and curl from Debian" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk nginx curl >/dev/null
    else
        echo "perf: needs wrk, nginx and curl (apt-get install -y wrk nginx curl)" >&2
        exit 2
    fi
fi
# The C SSE client (perf/sse_load.c) needs a compiler and OpenSSL's headers; without them
# bench.py falls back to perf/sse_load.py and says so.
if ! command -v cc >/dev/null || [ ! -f /usr/include/openssl/ssl.h ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "perf: installing gcc and libssl-dev from Debian" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcc libssl-dev >/dev/null \
            || echo "perf: could not install gcc and libssl-dev" >&2
    fi
fi
# S5 holds 1,000 streams: the proxy needs two descriptors per stream.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true
exec "${PYTHON:-python3}" "$here/bench.py" "$@"
