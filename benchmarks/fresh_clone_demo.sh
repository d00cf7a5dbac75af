#!/usr/bin/env bash
# `make demo` as a new user runs it: a fresh clone with no ../shared beside it and an empty
# cache, the released checkpoint and CIFAR-10 downloaded from a loopback mirror.
#
#   benchmarks/fresh_clone_demo.sh [ARGS for adderquant reproduce]
#   benchmarks/fresh_clone_demo.sh --bits 4 --limit 200 --agreement-images 1000   # shorter run
#
# The mirror serves, flat under one URL, the two checkpoints of ../shared/models and a
# cifar-10-python.tar.gz built from ../shared/data/cifar-10-batches-py (SHARED=DIR to take
# them elsewhere). That archive is not the official one, so its sha256 is declared in a local
# SHA256SUMS file ($ADDERQUANT_CHECKSUMS); the checkpoints are checked against the registry's
# sha256s. Clones the committed HEAD of this repository into a temporary folder (kept with
# KEEP=1), runs `make demo ARGS=...` there and prints where the table is.
set -euo pipefail

REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
SHARED=${SHARED:-$REPO/../shared}
WORK=$(mktemp -d)
SERVER_PID=
cleanup() {
    if [[ -n $SERVER_PID ]]; then kill "$SERVER_PID" 2>/dev/null || true; fi
    if [[ ${KEEP:-0} == 1 ]]; then echo "kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT

echo "== mirror in $WORK/mirror"
mkdir -p "$WORK/mirror"
cp "$SHARED/models/resnet20-adder-cifar10.pth" "$SHARED/models/resnet20-cnn-cifar10.th" \
    "$WORK/mirror/"
tar -C "$SHARED/data" -czf "$WORK/mirror/cifar-10-python.tar.gz" cifar-10-batches-py
(cd "$WORK/mirror" && sha256sum cifar-10-python.tar.gz) > "$WORK/SHA256SUMS"
python3 -u -m http.server --bind 127.0.0.1 --directory "$WORK/mirror" 0 \
    > "$WORK/server.log" 2>&1 &
SERVER_PID=$!
PORT=
for _ in $(seq 50); do
    PORT=$(sed -n 's/.* port \([0-9]*\) .*/\1/p' "$WORK/server.log" | head -1)
    [[ -n $PORT ]] && break
    sleep 0.1
done
[[ -n $PORT ]] || { cat "$WORK/server.log"; echo "mirror did not start" >&2; exit 1; }

echo "== fresh clone in $WORK/adderquant (no ../shared beside it)"
git clone -q "$REPO" "$WORK/adderquant"
[[ ! -e $WORK/shared ]]

export ADDERQUANT_BASE_URL=http://127.0.0.1:$PORT/
export ADDERQUANT_CHECKSUMS=$WORK/SHA256SUMS
export ADDERQUANT_NO_SHARED=1
export ADDERQUANT_HOME=$WORK/home
unset ADDERQUANT_DATA ADDERQUANT_MODELS ADDERQUANT_OFFLINE
cd "$WORK/adderquant"
make install > "$WORK/install.log" 2>&1 || { tail -20 "$WORK/install.log"; exit 1; }
echo "== make demo ARGS=\"$*\""
make demo ARGS="$*"
echo "== downloaded into the cache:"
(cd "$ADDERQUANT_HOME" && find . -maxdepth 2 | sort)
echo "== requests served by the mirror:"
grep -c '"GET ' "$WORK/server.log" | sed 's/$/ GET requests/'
