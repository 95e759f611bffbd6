#!/usr/bin/env bash
# The deployment, run for real: the compose cluster and the Kubernetes manifests on Podman.
#
#   deploy/test-cluster.sh            (as root, or with sudo; from a checkout with .venv set up)
#
# Installs Podman, podman-compose, runc and debootstrap when missing, makes a Debian base image without
# a registry (debootstrap + podman import), a wheel folder from what pip finds here, builds the image
# offline, then checks through `paramserver status` and /metrics:
#   compose, sync:  3 workers train and the loss falls; `podman kill` of a worker: the barrier drops it after
#                   --worker-timeout and training goes on; `podman stop` of the server writes a checkpoint,
#                   `podman start` resumes from that version and the workers reconnect on their own;
#                   `down` leaves no container behind (the named results volume is kept);
#   compose, async: `podman kill` of a worker: training goes on without waiting;
#   kubernetes:     every manifest validates (kubernetes-validate, strict); the server and worker pods of
#                   the StatefulSet and the Job train under `podman kube play`, and `podman kube down` removes them.
# Cleans up on failure too and prints every figure it checked, and the time of each phase.
# Environment: PY (python with the project installed; default .venv/bin/python), KEEP_IMAGES=1 keeps the
# images between runs (default: kept; they are the cache), METRICS_PORT (host port for /metrics, 19100).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
METRICS_PORT=${METRICS_PORT:-19100}
PROJECT=pstest
COMPOSE_FILE=deploy/docker-compose.yml
K8S_NET=pstest-k8s
IMAGE=localhost/paramserver:latest
BASE=localhost/pybase:bookworm
WORK=$(mktemp -d /tmp/pstest.XXXXXX)
SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
T_START=$(date +%s)
PHASES=()
CHECKS=()

say() { printf '[%4ds] %s\n' $(( $(date +%s) - T_START )) "$*"; }
check() { CHECKS+=("$*"); say "OK: $*"; }
fail() { say "FAILED: $*"; exit 1; }
phase_start() { PHASE_NAME=$1; PHASE_T0=$(date +%s); say "== $1"; }
phase_end() { PHASES+=("$(printf '%-42s %4ds' "$PHASE_NAME" $(( $(date +%s) - PHASE_T0 )))"); }

# the compose cluster's settings (deploy/docker-compose.yml reads these); a short --worker-timeout for the kill
export WORKERS=3 JOB=gpt MAX_BYTES=1000000 STEPS=100000 WORKER_TIMEOUT=6 HEARTBEAT=0.5 CHECKPOINT_EVERY=5 \
       LOG_EVERY=200 SERVER_TIMEOUT=300 METRICS_PORT BASE_IMAGE=$BASE
compose() { podman-compose -p "$PROJECT" -f "$COMPOSE_FILE" "$@" >>"$WORK/compose.log" 2>&1; }
project_containers() { podman ps -a -q --filter "label=io.podman.compose.project=$PROJECT"; }

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    if [ "$rc" != 0 ]; then
        say "cleaning up after a failure (exit $rc); the last lines of the logs:"
        for c in $(podman ps -a --format '{{.Names}}' 2>/dev/null | grep -E "^(${PROJECT}_|ps-0|worker-)"); do
            echo "--- $c"; podman logs "$c" 2>&1 | grep -v -e 'level=error msg=".*systemd' -e 'peer on .* disconnected' \
                | tail -"$([[ $c == *server* || $c == ps-0* ]] && echo 30 || echo 8)"
        done
        grep -v -e 'level=error msg=".*systemd' -e '^exit code' -e '^podman ' -e '^\[' "$WORK/compose.log" 2>/dev/null | tail -8
    fi
    if command -v podman >/dev/null; then
        [ -f "$WORK/workers.yaml" ] && podman kube down "$WORK/workers.yaml" >/dev/null 2>&1
        [ -f "$WORK/ps.yaml" ] && podman kube down "$WORK/ps.yaml" >/dev/null 2>&1
        podman-compose -p "$PROJECT" -f "$COMPOSE_FILE" down -v >/dev/null 2>&1
        for c in $(project_containers); do podman rm -f "$c" >/dev/null 2>&1; done
        podman volume rm -f "${PROJECT}_results" checkpoints-ps-0 >/dev/null 2>&1
        podman network rm -f "${PROJECT}_default" "$K8S_NET" >/dev/null 2>&1
    fi
    rm -rf "$WORK"
    echo
    echo "phase timings:"
    for p in "${PHASES[@]}"; do echo "  $p"; done
    echo "  total                                      $(( $(date +%s) - T_START ))s"
    if [ "$rc" = 0 ]; then
        echo "deploy/test-cluster.sh: all ${#CHECKS[@]} checks passed:"
        for c in "${CHECKS[@]}"; do echo "  - $c"; done
    fi
    exit "$rc"
}
trap cleanup EXIT INT TERM

# status FIELD-EXPRESSION [CONTAINER]: a Python expression over `paramserver status --json`
status() {
    podman exec "${2:-${PROJECT}_server_1}" paramserver status --json --timeout 5 2>/dev/null \
        | "$PY" -c 'import json, sys; s = json.load(sys.stdin); print(eval(sys.argv[1], {}, s))' "$1" 2>/dev/null
}
# scrape: fetch the server's /metrics on the host port; metric 'NAME{labels}': one sample of the last scrape
scrape() {
    "$PY" -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode())' \
        "http://127.0.0.1:$METRICS_PORT/metrics" >"$WORK/metrics.txt" 2>/dev/null || fail "GET /metrics"
}
metric() {
    "$PY" - "$WORK/metrics.txt" "$1" <<'EOF' 2>/dev/null
import sys
for line in open(sys.argv[1]).read().splitlines():
    name, _, value = line.rpartition(" ")
    if name == sys.argv[2]:
        print(float(value)); break
EOF
}
# wait_for TIMEOUT WHAT COMMAND...: poll until COMMAND succeeds
wait_for() {
    local timeout=$1 what=$2; shift 2
    local deadline=$(( $(date +%s) + timeout ))
    until "$@"; do
        [ "$(date +%s)" -lt "$deadline" ] || fail "timed out after ${timeout}s waiting for $what"
        sleep 0.5
    done
}
ge() { local v; v=$(status "$1" "${3:-}"); [ -n "$v" ] && "$PY" -c "import sys; sys.exit(not float('$v') >= float('$2'))"; }
eq() { [ "$(status "$1" "${3:-}")" = "$2" ]; }
fgt() { "$PY" -c "import sys; sys.exit(not float('$1') > float('$2'))"; }

# ------------------------------------------------------------------------------------------------
phase_start "host setup (apt, containers.conf)"
missing=()
for p in podman podman-compose runc debootstrap; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ "${#missing[@]}" -gt 0 ]; then
    say "installing ${missing[*]}"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null \
        || fail "apt-get install ${missing[*]}"
fi
# runc with explicit limits: the sandboxes these tests run in refuse crun's cgroup mode and the default rlimits
if ! grep -qs 'runtime *= *"runc"' /etc/containers/containers.conf; then
    $SUDO mkdir -p /etc/containers
    [ -f /etc/containers/containers.conf ] && $SUDO cp /etc/containers/containers.conf "/etc/containers/containers.conf.bak.$$"
    printf '[containers]\ndefault_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]\n[engine]\nruntime = "runc"\n' \
        | $SUDO tee /etc/containers/containers.conf >/dev/null
fi
"$PY" -c 'import yaml, kubernetes_validate' 2>/dev/null || "$PY" -m pip install -q 'kubernetes-validate>=1.28' 'PyYAML>=6' \
    || fail "pip install kubernetes-validate"
check "podman $(podman version --format '{{.Client.Version}}'), $(dpkg -s podman-compose | awk '/^Version/{print "podman-compose " $2}')"
phase_end

phase_start "base image (debootstrap + podman import)"
if podman image exists "$BASE"; then
    say "$BASE exists (cached)"
else
    mirror=$(grep -hs -m1 '^URIs:' /etc/apt/sources.list.d/*.sources | awk '{print $2}' | grep -v security | head -1)
    [ -n "$mirror" ] || mirror=$(grep -hs '^deb ' /etc/apt/sources.list | awk '{print $2}' | grep -v security | head -1)
    mirror=${mirror:-http://deb.debian.org/debian}
    say "debootstrap bookworm from $mirror"
    $SUDO debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
        bookworm "$WORK/rootfs" "$mirror" >"$WORK/debootstrap.log" 2>&1 || { tail "$WORK/debootstrap.log"; fail "debootstrap"; }
    $SUDO tar -C "$WORK/rootfs" -c . | podman import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' - "$BASE" >"$WORK/import.log" 2>&1 \
        || fail "podman import"
    $SUDO rm -rf "$WORK/rootfs"
fi
phase_end

phase_start "wheel folder (deploy/wheels)"
if ls deploy/wheels/torch-*.whl >/dev/null 2>&1; then
    say "deploy/wheels has $(ls deploy/wheels | wc -l) wheels (cached)"
else
    deps=$("$PY" -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))")
    # shellcheck disable=SC2086
    "$PY" -m pip download -q -d deploy/wheels 'torch==2.13.0' $deps 'setuptools>=77' 2>&1 | grep -v '^WARNING: Location' \
        ; ls deploy/wheels/torch-*.whl >/dev/null 2>&1 || fail "pip download into deploy/wheels"
fi
phase_end

phase_start "image build (offline, podman build)"
podman build -q -f deploy/Dockerfile --build-arg BASE_IMAGE="$BASE" -t "$IMAGE" . >"$WORK/build.log" 2>&1 \
    || { tail -20 "$WORK/build.log"; fail "podman build"; }
[ "$(podman run --rm --entrypoint id "$IMAGE" -u)" = 1000 ] || fail "the image does not run as a non-root user"
check "image $IMAGE built offline from deploy/wheels: $(podman image inspect "$IMAGE" --format '{{.Size}}' \
    | awk '{printf "%.2f GB", $1/1e9}'), runs as uid 1000"
phase_end

# leftovers of an interrupted earlier run
compose down -v
podman pod rm -f ps-0 worker-0 worker-1 worker-2 >/dev/null 2>&1
podman volume rm -f "${PROJECT}_results" checkpoints-ps-0 >/dev/null 2>&1
podman network rm -f "${PROJECT}_default" "$K8S_NET" >/dev/null 2>&1

# ------------------------------------------------------------------------------------------------
phase_start "compose sync: up, training, loss"
MODE=sync compose up -d || fail "podman-compose up"
wait_for 120 "the server to answer status" ge version 0
podman healthcheck run "${PROJECT}_server_1" >/dev/null 2>&1 || fail "the server's health check (paramserver status)"
wait_for 180 "3 live workers and version 20" ge 'live * 1000 + min(version, 999)' 3020
v1=$(status version); l1=$(status 'round(loss, 4)'); ranks=$(status 'sorted(int(w) for w in workers)')
[ "$ranks" = "[0, 1, 2]" ] || fail "ranks assigned at registration: $ranks, want [0, 1, 2]"
wait_for 240 "version $((v1 + 100))" ge version $((v1 + 100))
v2=$(status version); l2=$(status 'round(loss, 4)')
fgt "$l1" "$l2" || fail "train loss did not fall: $l1 at version $v1 -> $l2 at version $v2"
check "compose sync: 3 workers with ranks $ranks assigned by the server; train loss $l1 at version $v1 -> $l2 at version $v2"
scrape
m_version=$(metric paramserver_theta_version); m_live=$(metric 'paramserver_workers{state="live"}')
m_applied=$(metric paramserver_gradients_applied_total); m_stale=$(metric paramserver_gradient_staleness_count)
m_handled=$(metric paramserver_message_handling_seconds_count)
fgt "$m_version" "$((v1 - 1))" && [ "$m_live" = 3.0 ] && fgt "$m_applied" 0 && [ "$m_stale" = "$m_applied" ] \
    || fail "/metrics: version $m_version, live $m_live, applied $m_applied, staleness count $m_stale"
check "/metrics on the host port $METRICS_PORT: theta version $m_version, live 3, applied $m_applied = staleness observations $m_stale, $m_handled messages timed"
phase_end

phase_start "compose sync: kill a worker"
podman kill "${PROJECT}_worker_3" >/dev/null || fail "podman kill"
t_kill=$(date +%s.%N)
wait_for 60 "the killed worker to be declared dead" ge 'counters.get("dead", 0)' 1
t_dead=$(date +%s.%N)
v_dead=$(status version)
wait_for 120 "sync training to go on with 2 workers" ge version $((v_dead + 30))
[ "$(status live)" = 2 ] || fail "live workers after the kill: $(status live), want 2"
scrape; m_dead=$(metric 'paramserver_workers{state="dead"}')
silent=$(podman logs "${PROJECT}_server_1" 2>&1 | grep -o 'silent for [0-9.]*s: declared dead' | tail -1 | awk '{print $3}' | tr -d :)
check "sync, podman kill of worker 3: declared dead after $silent of silence (server log; --worker-timeout $WORKER_TIMEOUT), seen dead through podman exec $("$PY" -c "print(round($t_dead - $t_kill, 1))")s after the kill, barrier went on with 2 live workers: version $v_dead -> $(status version); /metrics dead workers $m_dead"
phase_end

phase_start "compose sync: stop and start the server"
v_before=$(status version)
podman stop -t 30 "${PROJECT}_server_1" >/dev/null 2>&1 || fail "podman stop"
ck=$(podman logs "${PROJECT}_server_1" 2>&1 | grep -o 'checkpoint at version [0-9]*' | tail -1 | awk '{print $4}')
[ -n "$ck" ] && [ "$ck" -ge "$v_before" ] || fail "no final checkpoint on SIGTERM (last: '$ck', version before $v_before)"
t_start=$(date +%s.%N)
podman start "${PROJECT}_server_1" >/dev/null 2>&1 || fail "podman start"
wait_for 60 "the restarted server to resume" sh -c "podman logs ${PROJECT}_server_1 2>&1 | grep -q 'resumed from /data/checkpoint.pt at version $ck '"
wait_for 120 "the 2 workers to reconnect and train on" ge 'live * 100000 + version' $((200000 + ck + 20))
t_back=$(date +%s.%N)
check "podman stop (SIGTERM): final checkpoint at version $ck; podman start: resumed at version $ck, the 2 live workers re-registered on their own and trained to version $(status version) within $("$PY" -c "print(round($t_back - $t_start, 1))")s"
phase_end

phase_start "compose sync: down"
compose down || fail "podman-compose down"
left=$(project_containers | wc -l)
vols=$(podman volume ls -q | grep -E "^${PROJECT}_|^[0-9a-f]{64}$" | tr '\n' ' ')
nets=$(podman network ls --format '{{.Name}}' | grep "^${PROJECT}_" | tr '\n' ' ')
[ "$left" = 0 ] || fail "down left $left containers"
[ "$vols" = "${PROJECT}_results " ] || fail "volumes after down: '$vols' (want only ${PROJECT}_results)"
check "down: 0 containers, volumes left: ${vols}(the named results volume, kept by design), networks left: ${nets:-none}$([ -n "$nets" ] && echo " (podman-compose $(dpkg -s podman-compose | awk '/^Version/{print $2}') does not remove its network; docker compose does; removed here)")"
podman network rm -f "${PROJECT}_default" >/dev/null 2>&1
podman volume rm -f "${PROJECT}_results" >/dev/null
phase_end

# ------------------------------------------------------------------------------------------------
phase_start "compose async: kill a worker"
MODE=async compose up -d || fail "podman-compose up (async)"
wait_for 180 "3 live workers and version 30" ge 'live * 1000 + min(version, 999)' 3030
# read through /metrics (an HTTP request from the host, faster than `podman exec`): well inside --worker-timeout
podman kill "${PROJECT}_worker_3" >/dev/null || fail "podman kill"
scrape; v_kill=$(metric paramserver_theta_version)
sleep 1.5
scrape; v_2s=$(metric paramserver_theta_version); dead_2s=$(metric 'paramserver_events_total{event="dead"}')
[ "${dead_2s:-0}" = 0 ] || [ "${dead_2s:-0}" = 0.0 ] || fail "the worker was declared dead within 1.5s (--worker-timeout $WORKER_TIMEOUT)"
fgt "$v_2s" "$v_kill" || fail "async did not go on after the kill: version $v_kill -> $v_2s"
wait_for 60 "the killed worker to be declared dead" ge 'counters.get("dead", 0)' 1
check "async, podman kill of worker 3: version $v_kill -> $v_2s in the 1.5s after the kill, before it was declared dead (no waiting for it); declared dead after --worker-timeout; version now $(status version)"
compose down -v || fail "podman-compose down -v"
[ "$(project_containers | wc -l)" = 0 ] || fail "down left containers"
podman network rm -f "${PROJECT}_default" >/dev/null 2>&1
phase_end

# ------------------------------------------------------------------------------------------------
phase_start "kubernetes: validate, kube play, train, kube down"
"$PY" -m kubernetes_validate --strict --quiet deploy/k8s/configmap.yaml deploy/k8s/ps.yaml deploy/k8s/workers.yaml \
    deploy/k8s/gpu/workers-gpu.yaml >"$WORK/validate.log" 2>&1 || { cat "$WORK/validate.log"; fail "kubernetes-validate"; }
kv=$("$PY" -c 'import kubernetes_validate.utils as u; print(u.latest_version())' 2>/dev/null || echo default)
check "kubernetes-validate --strict (schemas of Kubernetes $kv): ConfigMap, Service, StatefulSet, Job, GPU Job patch all valid"
podman network create "$K8S_NET" >/dev/null 2>&1 || podman network exists "$K8S_NET" || fail "podman network create"
sets=(--set WORKERS=3 --set MAX_BYTES=$MAX_BYTES --set STEPS=$STEPS --set WORKER_TIMEOUT=$WORKER_TIMEOUT --set HEARTBEAT=$HEARTBEAT --set CHECKPOINT_EVERY=$CHECKPOINT_EVERY)
"$PY" deploy/k8s_podman.py server "$WORK/ps.yaml" "${sets[@]}" || fail "k8s_podman.py server"
podman kube play --network "$K8S_NET" "$WORK/ps.yaml" >>"$WORK/kube.log" 2>&1 || { cat "$WORK/kube.log"; fail "podman kube play (server)"; }
wait_for 120 "the ps-0 pod's server to answer" ge version 0 ps-0-server
ip=$(podman inspect ps-0-server --format '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}')
"$PY" deploy/k8s_podman.py workers "$ip" "$WORK/workers.yaml" "${sets[@]}" || fail "k8s_podman.py workers"
podman kube play --network "$K8S_NET" "$WORK/workers.yaml" >>"$WORK/kube.log" 2>&1 || { cat "$WORK/kube.log"; fail "podman kube play (workers)"; }
wait_for 180 "3 live workers and version 20 in the pods" ge 'live * 1000 + min(version, 999)' 3020 ps-0-server
k1=$(status version ps-0-server); kl1=$(status 'round(loss, 4)' ps-0-server)
wait_for 240 "version $((k1 + 60)) in the pods" ge version $((k1 + 60)) ps-0-server
k2=$(status version ps-0-server); kl2=$(status 'round(loss, 4)' ps-0-server)
fgt "$kl1" "$kl2" || fail "pods: train loss did not fall: $kl1 -> $kl2"
kranks=$(status 'sorted(int(w) for w in workers)' ps-0-server)
podman kube down "$WORK/workers.yaml" >/dev/null 2>&1 || fail "podman kube down (workers)"
podman kube down "$WORK/ps.yaml" >/dev/null 2>&1 || fail "podman kube down (server)"
pods=$(podman pod ls -q | wc -l); ctrs=$(podman ps -a -q --filter name='^(ps-0|worker-)' | wc -l)
[ "$pods" = 0 ] && [ "$ctrs" = 0 ] || fail "kube down left $pods pods, $ctrs containers"
check "kube play of the StatefulSet's and the Job's pod templates (ps-0 + worker-0..2, ranks $kranks from JOB_COMPLETION_INDEX): train loss $kl1 at version $k1 -> $kl2 at version $k2; kube down: 0 pods, 0 containers (the PVC's volume checkpoints-ps-0 stays, as on Kubernetes; removed here)"
podman volume rm -f checkpoints-ps-0 >/dev/null 2>&1
podman network rm -f "$K8S_NET" >/dev/null 2>&1
rm -f "$WORK/ps.yaml" "$WORK/workers.yaml"
phase_end
