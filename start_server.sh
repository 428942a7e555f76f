#!/usr/bin/env bash
# Vast.ai template entry point for a Vespa worker.
#
#   1. checks the variables Vast provides (one message naming everything missing);
#   2. rotates MODEL_LOG (appended to $MODEL_LOG.old, then emptied) so that lines of an earlier
#      run (before a reboot) do not decide this start;
#   3. creates (or reuses) a virtualenv under $WORKSPACE_DIR and installs Vespa ($VESPA_SPEC);
#   4. with USE_SSL=true: makes a key + CSR and has the Vast console sign the instance
#      certificate: for an EC P-256 key, or an RSA-2048 one (what Vast's own scripts make) if
#      the console does not sign that; an answer that is not a PEM certificate for the key
#      stops the start (never saved);
#   5. runs `twistd -n --pidfile= vespa` on tcp:$WORKER_PORT or ssl:$WORKER_PORT.
# The script works on its own (a Vast template downloads just this file): with PYWORKER_REPO
# (a git URL of this repository) and optionally PYWORKER_REF (a branch, tag or commit), Vespa
# is installed from there.
# When any step fails, or Vespa exits with an error, an error beacon (a /worker_status/ body
# with error_msg and the worker's public url) is posted to EVERY address in REPORT_ADDR.
#
# Overridable (besides Vespa's own settings, which twistd reads from the environment):
#   WORKSPACE_DIR (/workspace)  VESPA_VENV ($WORKSPACE_DIR/vespa-venv)  VESPA_PYTHON (python3)
#   VESPA_SPEC (what pip installs: a path or git+https://HOST/REPO@REF; default:
#              git+$PYWORKER_REPO@$PYWORKER_REF when PYWORKER_REPO is set, else the checkout
#              this script is in. Not "vespa": that PyPI name is an unrelated project.)
#   MODEL_LOG (also MODEL_LOG_FILE; the model server's log, rotated at start)
#   VESPA_PIP_ARGS (extra pip arguments)  VESPA_ARGS (extra twistd vespa arguments); both
#              split at spaces, without quotes
#   SIGN_CERT_URL (https://console.vast.ai/api/v0/sign_cert/?instance_id=$CONTAINER_ID)
#   SIGN_CERT_RETRIES (3: curl retries on transient errors, with 1, 2, 4 s pauses)
#   SSL_CERT (/etc/instance.crt)  SSL_KEY (/etc/instance.key)
#   SSL_KEY_TYPE (ec: P-256, or RSA-2048 when the console does not sign it; rsa: RSA-2048)
set -Eeuo pipefail

WORKSPACE_DIR=${WORKSPACE_DIR:-/workspace}
VESPA_VENV=${VESPA_VENV:-$WORKSPACE_DIR/vespa-venv}
VESPA_PYTHON=${VESPA_PYTHON:-python3}
VESPA_SPEC=${VESPA_SPEC:-}
PYWORKER_REPO=${PYWORKER_REPO:-}
PYWORKER_REF=${PYWORKER_REF:-}
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
if [ -z "$VESPA_SPEC" ] && [ -n "$PYWORKER_REPO" ]; then
    VESPA_SPEC="git+${PYWORKER_REPO#git+}${PYWORKER_REF:+@$PYWORKER_REF}"
elif [ -z "$VESPA_SPEC" ] && grep -qs '^name = vast-vespa$' "$HERE/setup.cfg"; then
    VESPA_SPEC=$HERE
fi
MODEL_LOG=${PYWORKER_MODEL_LOG:-${MODEL_LOG:-${PYWORKER_MODEL_LOG_FILE:-${MODEL_LOG_FILE:-}}}}
VESPA_PIP_ARGS=${VESPA_PIP_ARGS:-}
VESPA_ARGS=${VESPA_ARGS:-}
REPORT_ADDR=${PYWORKER_REPORT_ADDR:-${REPORT_ADDR:-https://run.vast.ai}}
WORKER_PORT=${PYWORKER_WORKER_PORT:-${WORKER_PORT:-3000}}
USE_SSL=${PYWORKER_USE_SSL:-${USE_SSL:-true}}
SSL_CERT=${PYWORKER_SSL_CERT:-${SSL_CERT:-/etc/instance.crt}}
SSL_KEY=${PYWORKER_SSL_KEY:-${SSL_KEY:-/etc/instance.key}}
SSL_KEY_TYPE=${SSL_KEY_TYPE:-ec}
CONTAINER_ID=${PYWORKER_CONTAINER_ID:-${CONTAINER_ID:-}}
MASTER_TOKEN=${PYWORKER_MASTER_TOKEN:-${MASTER_TOKEN:-}}
PUBLIC_IPADDR=${PYWORKER_PUBLIC_IPADDR:-${PUBLIC_IPADDR:-}}
SIGN_CERT_URL=${SIGN_CERT_URL:-https://console.vast.ai/api/v0/sign_cert/?instance_id=$CONTAINER_ID}
SIGN_CERT_RETRIES=${SIGN_CERT_RETRIES:-3}
export REPORT_ADDR WORKER_PORT USE_SSL SSL_CERT SSL_KEY

log() {
    printf 'start_server.sh: %s\n' "$*" >&2
}

# The worker's public URL, byte-identical to what Vespa reports (PROTOCOL.md 1.2).
worker_url() {
    local port_var="VAST_TCP_PORT_${WORKER_PORT}" scheme=http
    case "$WORKER_PORT" in '' | *[!0-9]*) return 0 ;; esac # not a variable name: no URL
    [ "$USE_SSL" = true ] && scheme=https
    if [ -n "$PUBLIC_IPADDR" ] && [ -n "${!port_var:-}" ]; then
        printf '%s://%s:%s' "$scheme" "$PUBLIC_IPADDR" "${!port_var}"
    fi
}

# POST an error beacon to every REPORT_ADDR entry; the body is built by json.dumps, so the
# message is always escaped. Never fails: the beacon is best effort.
send_beacon() {
    local message=$1 body addr python
    python=$(command -v python3 || printf '%s' "$VESPA_PYTHON")
    # The token goes through the environment, and the body through stdin: a command line
    # is there for anyone on the host to read (ps).
    body=$(BEACON_TOKEN=$MASTER_TOKEN "$python" -c '
import json, os, sys
container, url, message = sys.argv[1:4]
token = os.environ["BEACON_TOKEN"]
print(json.dumps({
    "id": int(container) if container.isdigit() else None, "mtoken": token,
    "version": "vespa", "loadtime": 0.0, "cur_load": 0.0, "rej_load": 0.0, "new_load": 0.0,
    "error_msg": message, "max_perf": 0.0, "cur_perf": 0.0, "cur_capacity": 0,
    "max_capacity": 0, "num_requests_working": 0, "num_requests_recieved": 0,
    "additional_disk_usage": 0.0, "working_request_idxs": [], "url": url,
}))' "$CONTAINER_ID" "$(worker_url)" "$message") || {
        log "could not build the error beacon with $python"
        return 0
    }
    local IFS=,
    for addr in $REPORT_ADDR; do
        addr=${addr//[[:space:]]/}
        [ -n "$addr" ] || continue
        if printf '%s' "$body" | curl -sS -o /dev/null --max-time 10 --retry 2 -X POST \
            -H 'Content-Type: application/json' --data-binary @- "${addr%/}/worker_status/"; then
            log "error beacon sent to ${addr%/}"
        else
            log "could not send the error beacon to ${addr%/}"
        fi
    done
}

# Stop the start: log, beacon, exit non-zero.
fail() {
    trap - ERR
    log "ERROR: $1"
    send_beacon "Vespa failed to start: $1"
    exit "${2:-1}"
}

STEP="starting"
trap 'fail "unexpected error while $STEP (line $LINENO)"' ERR

check_variables() {
    case "$WORKER_PORT" in
        '' | *[!0-9]*) fail "WORKER_PORT=$WORKER_PORT is not a port number" ;;
    esac
    case "${USE_SSL,,}" in # as Vespa reads it
        true | yes | on | 1) USE_SSL=true ;;
        false | no | off | 0) USE_SSL=false ;;
        *) fail "USE_SSL=$USE_SSL is neither true nor false" ;;
    esac
    # Split at spaces, with no shell quoting: a quote would reach pip or twistd as a character.
    local name
    for name in VESPA_ARGS VESPA_PIP_ARGS; do
        case "${!name}" in
            *[\"\']*) fail "$name is split at spaces and takes no quotes (give a value with spaces through its environment variable instead; the value is not shown: it may hold a password)" ;;
        esac
    done
    local missing=() port_var="VAST_TCP_PORT_${WORKER_PORT}"
    [ -n "$CONTAINER_ID" ] || missing+=("CONTAINER_ID")
    [ -n "$MASTER_TOKEN" ] || missing+=("MASTER_TOKEN")
    [ -n "$PUBLIC_IPADDR" ] || missing+=("PUBLIC_IPADDR")
    [ -n "${!port_var:-}" ] || missing+=("$port_var")
    [ -n "$VESPA_SPEC" ] || missing+=("VESPA_SPEC")
    if [ "${#missing[@]}" -gt 0 ]; then
        fail "missing environment variable(s): ${missing[*]} (Vast sets all but VESPA_SPEC in serverless instances; VESPA_SPEC is a path or git+https://HOST/REPO@REF, or set PYWORKER_REPO and PYWORKER_REF)"
    fi
    case "$CONTAINER_ID" in
        *[!0-9]*) fail "CONTAINER_ID=$CONTAINER_ID is not a number" ;;
    esac
    case "$SSL_KEY_TYPE" in
        ec | rsa) ;;
        *) fail "SSL_KEY_TYPE=$SSL_KEY_TYPE is not ec or rsa" ;;
    esac
}

# Before the (slow) install: a model server started alongside may write its load line meanwhile,
# and that line must stay. Appended and emptied rather than moved, so that a server already
# writing to the file keeps writing where Vespa reads.
rotate_model_log() {
    STEP="rotating the model log $MODEL_LOG"
    if [ -n "$MODEL_LOG" ] && [ -s "$MODEL_LOG" ]; then
        cat "$MODEL_LOG" >>"$MODEL_LOG.old" || fail "could not append $MODEL_LOG to $MODEL_LOG.old"
        : >"$MODEL_LOG" || fail "could not empty $MODEL_LOG"
        log "model log $MODEL_LOG rotated (earlier lines in $MODEL_LOG.old)"
    fi
}

install_vespa() {
    STEP="creating the virtualenv $VESPA_VENV"
    local reused=false
    if [ -x "$VESPA_VENV/bin/python" ] && "$VESPA_VENV/bin/python" -m pip --version >/dev/null 2>&1; then
        log "reusing the virtualenv $VESPA_VENV"
        reused=true
    else
        if [ -e "$VESPA_VENV/pyvenv.cfg" ]; then # made, but not to the end (a stop meanwhile)
            log "the virtualenv $VESPA_VENV is incomplete (no pip); making it again"
            rm -rf "$VESPA_VENV"
        fi
        log "creating the virtualenv $VESPA_VENV"
        mkdir -p "$(dirname "$VESPA_VENV")"
        "$VESPA_PYTHON" -m venv "$VESPA_VENV" || fail "could not create the virtualenv $VESPA_VENV with $VESPA_PYTHON"
    fi
    STEP="installing Vespa"
    local shown
    shown=$(printf '%s' "$VESPA_SPEC" | sed -E 's#//[^/@]*@#//***@#') # no token in a URL
    log "installing Vespa ($shown)"
    local extra=()
    read -r -a extra <<<"$VESPA_PIP_ARGS"
    "$VESPA_VENV/bin/python" -m pip install -q "${extra[@]}" "$VESPA_SPEC" ||
        fail "pip could not install Vespa from VESPA_SPEC=$shown"
    case "$reused:$VESPA_SPEC" in
        true:git+*) # pip keeps an installed version as it is, even when the branch moved on
            "$VESPA_VENV/bin/python" -m pip install -q --force-reinstall --no-deps \
                "${extra[@]}" "$VESPA_SPEC" ||
                fail "pip could not install Vespa from VESPA_SPEC=$shown"
            ;;
    esac
}

# Key + CSR, signed by the Vast console (PROTOCOL.md 6.7), for an EC P-256 key first
# (SSL_KEY_TYPE=ec): every full TLS handshake (a client that keeps no session) signs with the
# key, and a P-256 signature takes the GPU host's CPU a small fraction of an RSA-2048 one's
# time (docs/performance.md). If the console answers that CSR with anything but a certificate
# for its key, an RSA-2048 one (what Vast's own scripts send) is asked for. The answer must be a PEM certificate for the key: anything else (an HTML
# error page, say) stops the start and is never saved.
sign_certificate() {
    STEP="creating the TLS certificate"
    local dir why signed=false
    dir=$(mktemp -d)
    if [ "$SSL_KEY_TYPE" = ec ]; then
        if why=$(request_certificate "$dir" ec); then
            signed=true
        else
            log "the certificate signer did not sign an EC P-256 key ($why); asking for an RSA-2048 one"
        fi
    fi
    if [ "$signed" = false ] && why=$(request_certificate "$dir" rsa); then
        signed=true
    fi
    rm -rf "$dir"
    [ "$signed" = true ] || fail "$why"
}

# One signing request, for a new key of type $2 (ec or rsa), made in the directory $1. On
# success the key is at SSL_KEY and its certificate at SSL_CERT; otherwise neither is written
# and the reason is printed.
request_certificate() {
    local dir=$1 type=$2 usage status excerpt
    local csr="$dir/instance.csr" answer="$dir/instance.crt" key="$dir/instance.key"
    local newkey=(-newkey rsa:2048)
    usage="nonRepudiation, digitalSignature, keyEncipherment"
    if [ "$type" = ec ]; then
        newkey=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1)
        usage="digitalSignature" # an EC key signs; it never enciphers a key
    fi
    cat >"$dir/san.cnf" <<EOF
[req]
distinguished_name = dn
req_extensions = v3_req
prompt = no
[dn]
C = US
ST = CA
CN = pyworker.vast.ai
[v3_req]
basicConstraints = CA:FALSE
keyUsage = $usage
subjectAltName = IP:0.0.0.0
EOF
    rm -f "$answer"
    if ! (umask 077 && openssl req -new "${newkey[@]}" -nodes -sha256 -keyout "$key" \
        -out "$csr" -config "$dir/san.cnf" 2>/dev/null); then
        echo "openssl could not create the $type key and CSR"
        return 1
    fi
    log "asking $SIGN_CERT_URL to sign the instance certificate ($type key)"
    if ! status=$(curl -sS -o "$answer" -w '%{http_code}' --max-time 60 --retry "$SIGN_CERT_RETRIES" \
        --retry-connrefused -X POST -H 'Content-Type: application/octet-stream' \
        --data-binary "@$csr" "$SIGN_CERT_URL"); then
        echo "could not reach the certificate signer $SIGN_CERT_URL"
        return 1
    fi
    if [ "$status" != 200 ] || ! grep -q -- '-----BEGIN CERTIFICATE-----' "$answer" ||
        ! openssl x509 -noout -in "$answer" 2>/dev/null; then
        excerpt=$(head -c 200 "$answer" 2>/dev/null | tr -c '[:print:]' ' ')
        echo "the certificate signer answered HTTP $status without a PEM certificate: $excerpt"
        return 1
    fi
    if [ "$(openssl x509 -noout -pubkey -in "$answer")" != "$(openssl pkey -pubout -in "$key")" ]; then
        echo "the certificate signer answered with a certificate for another key"
        return 1
    fi
    # (The key was made readable by its owner alone: umask 077.)
    if ! mkdir -p "$(dirname "$SSL_KEY")" "$(dirname "$SSL_CERT")" || ! mv "$key" "$SSL_KEY" ||
        ! mv "$answer" "$SSL_CERT"; then
        echo "could not write the key and certificate to $SSL_KEY and $SSL_CERT"
        return 1
    fi
    log "instance certificate ($type key) written to $SSL_CERT"
}

# A path inside a Twisted endpoint string: escape the separators.
endpoint_path() {
    local path=${1//\\/\\\\}
    path=${path//:/\\:}
    printf '%s' "${path//=/\\=}"
}

run_vespa() {
    STEP="starting Vespa"
    local listen="tcp:$WORKER_PORT:backlog=1024" extra=() child tee_pid status=0 errors last stopped
    local logged log_pid
    if [ "$USE_SSL" = true ]; then
        listen="ssl:$WORKER_PORT:backlog=1024:privateKey=$(endpoint_path "$SSL_KEY"):certKey=$(endpoint_path "$SSL_CERT")"
    fi
    read -r -a extra <<<"$VESPA_ARGS"
    local listen_flag=(--listen "$listen")
    if [ -n "${PYWORKER_LISTEN:-${LISTEN:-}}" ]; then # the user's own listener: Vespa reads it
        listen_flag=()
        listen="${PYWORKER_LISTEN:-${LISTEN:-}} (LISTEN)"
    fi
    log "starting Vespa on $listen"
    trap - ERR
    # A child, not exec: its exit status decides the beacon. Signals are passed on so that
    # Vespa drains in-flight requests on a container stop. Its stderr (start-up errors, not
    # the log) is kept too: the last line goes into the beacon. So is the log's last error
    # line (twistd logs what is written to stderr once it runs: a port already in use),
    # for when stderr has none.
    errors=$(mktemp)
    logged=$(mktemp)
    exec 3> >(tee "$errors" >&2)
    tee_pid=$!
    # (sed -u: passes each line on as it comes, where awk may wait for a full buffer.)
    exec 4> >(sed -u -e "/#\(error\|critical\)] /w $logged")
    log_pid=$!
    "$VESPA_VENV/bin/twistd" -n --pidfile= vespa "${listen_flag[@]}" "${extra[@]}" >&4 2>&3 &
    child=$!
    exec 3>&- 4>&-
    stopped=false
    trap 'stopped=true; kill -TERM "$child" 2>/dev/null || true' TERM INT
    wait "$child" || status=$?
    while kill -0 "$child" 2>/dev/null; do # a forwarded signal interrupted wait: wait again
        status=0
        wait "$child" || status=$?
    done
    # twistd ends itself with the signal that stopped it (exit status 128 + SIGTERM) after a
    # clean drain: a stop that was asked for is not an error.
    if [ "$stopped" = true ] && [ "$status" -eq 143 ]; then
        status=0
    fi
    wait "$tee_pid" "$log_pid" || true # the copies of stderr and of the log are complete
    last=$(grep -v '^[[:space:]]*$' "$errors" | tail -n 1 | cut -c 1-500 || true)
    if [ -z "$last" ]; then
        last=$(tail -n 1 "$logged" | cut -c 1-500 || true)
        last=${last#*] } # without the log's time and namespace
    fi
    rm -f "$errors" "$logged"
    if [ "$status" -ne 0 ]; then
        fail "Vespa exited with code $status${last:+: $last}" "$status"
    fi
    log "Vespa stopped"
}

check_variables
rotate_model_log
install_vespa
if [ "$USE_SSL" = true ]; then
    sign_certificate
fi
run_vespa
