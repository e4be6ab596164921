#!/usr/bin/env bash
# The GPU check, ready to run on a machine with a GPU: writes results/device_check.json.
#
#   scripts/device_check.sh                  # CUDA device 0, about 3-6 minutes on one GPU
#   scripts/device_check.sh --device cuda:1  # another GPU; --device mps on Apple Silicon
#   scripts/device_check.sh --dry            # the same checks on the CPU, shortest (no GPU needed)
#
# It checks, with real `swarmfold train`, `run` and `simulate` processes on the device:
# two identical runs give the same sha256, resume is bitwise, two peers sharing the device
# commit the same bits as `simulate` on it, bf16 is deterministic, and the inner loop's
# tokens/s against a plain PyTorch loop (scripts/device_check.py says how).
#
# Python: $SWARMFOLD_PYTHON if set, else the first of .venv/bin/python, .venv-device/bin/python
# and python3 whose torch sees the device and that has swarmfold's dependencies. If only the
# system python3 has a torch that sees the device, it makes .venv-device with
# --system-site-packages (keeping that torch) and installs swarmfold into it (needs the
# dependencies from a package index or the pip cache). It never installs torch: a CUDA build of
# torch must be there already (pip install torch==<version> --index-url
# https://download.pytorch.org/whl/cu124, for example). The whole run is limited to
# $DEVICE_CHECK_TIMEOUT seconds (default 480); each failure says what to do.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"

DEVICE=cuda
DRY=0
OUT="$REPO/results/device_check.json"
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="${2:?--device needs a value: cuda, cuda:N, mps or cpu}"; shift 2 ;;
    --dry) DRY=1; DEVICE=cpu; shift ;;
    --out) OUT="${2:?--out needs a path}"; case "$OUT" in /*) ;; *) OUT="$PWD/$OUT" ;; esac; shift 2 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "device_check.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
  esac
done
LIMIT="${DEVICE_CHECK_TIMEOUT:-480}"
cd "$REPO"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # swarmfold from this checkout, whichever Python

fail() { echo "device_check.sh: error: $*" >&2; exit 2; }

# ok PYTHON: it imports torch and swarmfold's dependencies and resolves the device
ok() {
  "$1" - "$DEVICE" <<'PY' 2>/dev/null
import sys
import hivemind, safetensors, torch, transformers  # noqa: F401
from swarmfold.peer.device import resolve_device
resolve_device(sys.argv[1])
PY
}

PY=""
for cand in ${SWARMFOLD_PYTHON:-} .venv/bin/python .venv-device/bin/python python3; do
  if command -v "$cand" >/dev/null 2>&1 && ok "$cand"; then PY="$cand"; break; fi
done

if [ -z "$PY" ]; then
  SYS=$(command -v python3 || true)
  [ -n "$SYS" ] || fail "no python3 on PATH; install Python 3.11+ and a torch build for $DEVICE"
  if ! "$SYS" -c "import torch; from swarmfold.peer.device import resolve_device; resolve_device('$DEVICE')"; then
    fail "no Python here has a torch that sees $DEVICE (tried ${SWARMFOLD_PYTHON:-} .venv/bin/python" \
         ".venv-device/bin/python python3; the message above says what python3's torch found). Install a" \
         "CUDA build of torch, e.g. pip install torch --index-url https://download.pytorch.org/whl/cu124," \
         "or point SWARMFOLD_PYTHON at a Python that has one"
  fi
  echo "device_check.sh: making .venv-device on $SYS's torch and installing swarmfold into it" >&2
  "$SYS" -m venv --system-site-packages .venv-device || fail "python3 -m venv failed (apt-get install python3-venv?)"
  .venv-device/bin/pip install --quiet -e . \
    || fail "installing swarmfold's dependencies into .venv-device failed (no package index reachable?);" \
            "install them into $SYS, or set SWARMFOLD_PYTHON"
  ok .venv-device/bin/python || fail ".venv-device still cannot import swarmfold's dependencies or see $DEVICE"
  PY=.venv-device/bin/python
fi

echo "device_check.sh: $PY on $DEVICE, limit ${LIMIT}s, writing $OUT" >&2
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" >&2
ARGS=(--device "$DEVICE" --out "$OUT")
[ "$DRY" = 1 ] && ARGS+=(--quick)
set +e
timeout --kill-after=10 "$LIMIT" "$PY" scripts/device_check.py "${ARGS[@]}"
rc=$?
set -e
if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
  fail "the check ran past ${LIMIT}s and was stopped; raise DEVICE_CHECK_TIMEOUT or look at the output above"
fi
exit "$rc"
