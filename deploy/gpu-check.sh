#!/usr/bin/env bash
# The GPU measurement of issue 10 in one command: `paramserver bench scale` on a CUDA machine, the parameter
# server (4 workers sharing the GPU) against single-process training of the same model at the same global batch.
#
#   deploy/gpu-check.sh fetch        # first, here, where the package registry is reachable: download the pyzmq
#                                    # wheel into deploy/gpu-wheels/ (git-ignored; PYZMQ_VERSION=... for another)
#   deploy/gpu-check.sh [FLAGS...]   # then on the GPU machine, with deploy/gpu-wheels/ copied beside the
#                                    # checkout: results under $OUT (default runs/gpu-check)
#
# The GPU machine's python3 has torch, numpy and msgpack but no pyzmq, and reaches no registry: pyzmq is
# installed from the wheel that `fetch` put in deploy/gpu-wheels/ (pyzmq 27.3.0, cp312 abi3, manylinux_2_28
# x86_64, libzmq bundled, 855 KB; not in git: a tool that copies only what git tracks must be told to carry
# that folder) into /tmp/ps-site. Nothing else is installed; the project runs from this checkout through
# PYTHONPATH. See deploy/README.md, "The GPU check". FLAGS go to `paramserver bench scale` after this script's
# own (--device cuda --out ... and, by default, issue 20's local-step variants: 4 workers, H = 50 with outer
# averaging, with int8 pushes, async, and per-step sync over 4 bf16 shards, 200 steps of a global batch of 64),
# so they override them, e.g. --variants 'sync;async' or --budget 300 (or GPU_VARIANTS='...').
# $OUT receives env.txt (versions, GPU), scale.log (the printed table), scale.json and logs.tgz (every run's
# server and worker logs and metrics, checkpoints left out); the runs themselves go to $SCALE_RUNS
# (default /tmp/ps-scale). Variables: PYTHON (python3), OUT, SCALE_RUNS, SCALE_TIMEOUT (540: seconds before the
# bench is stopped; its --budget, 420 by default, normally ends it first), PYZMQ_VERSION (fetch: 27.3.0).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WHEELS=deploy/gpu-wheels

if [ "${1:-}" = fetch ]; then
    tmp=$(mktemp -d)
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$tmp" "pyzmq==${PYZMQ_VERSION:-27.3.0}"
    mkdir -p "$WHEELS"
    rm -f "$WHEELS"/pyzmq-*.whl      # one wheel only: the install takes the first it finds
    mv "$tmp"/pyzmq-*.whl "$WHEELS"/
    rmdir "$tmp"
    ls -l "$WHEELS"
    exit 0
fi

OUT=${OUT:-runs/gpu-check}
RUNS=${SCALE_RUNS:-/tmp/ps-scale}
mkdir -p "$OUT" "$RUNS"
if ! "$PY" -c "import zmq" 2>/dev/null; then
    whl=$(ls "$WHEELS"/pyzmq-*.whl 2>/dev/null | head -n 1 || true)
    if [ -z "$whl" ]; then
        echo "gpu-check: $PY has no pyzmq and $WHEELS/ holds no pyzmq wheel: run 'deploy/gpu-check.sh fetch'" \
             "where the registry is reachable, and copy $WHEELS/ (git-ignored) to this machine with the checkout" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/ps-site "$whl"
    export PYTHONPATH=/tmp/ps-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1

{
    date -u
    nvidia-smi -L 2>/dev/null || echo "nvidia-smi: not available"
    "$PY" -c "import sys, torch, zmq, msgpack, numpy; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '-',
'| pyzmq', zmq.__version__, 'libzmq', zmq.zmq_version(), '| msgpack', msgpack.version, '| numpy', numpy.__version__)" || true
    echo "cpus $(nproc)  /dev/shm $(df -h /dev/shm 2>/dev/null | awk 'NR==2 {print $2 " total, " $4 " free"}')"
} 2>&1 | tee "$OUT/env.txt"

set +e
# a hard stop inside a 600 s device call, so that the results so far are still copied (scale.json is rewritten
# after every run; SIGTERM stops the run in progress and its processes cleanly)
timeout --signal=TERM --kill-after=30 "${SCALE_TIMEOUT:-540}" \
    "$PY" -m paramserver bench scale --device cuda --out "$RUNS" --global-batches 64 --steps 200 \
        --variants "${GPU_VARIANTS:-sync,local=50;sync,local=50,compress=int8;async,local=50;sync,shards=4,wire=bf16}" \
        "$@" 2>&1 | tee "$OUT/scale.log"
rc=${PIPESTATUS[0]}
set -e
cp "$RUNS/scale.json" "$OUT/scale.json" 2>/dev/null || echo "gpu-check: no scale.json was written" >&2
tar czf "$OUT/logs.tgz" -C "$RUNS" --exclude='*.pt' . 2>/dev/null || true
echo "gpu-check: bench exit code $rc; results in $OUT"
exit "$rc"
