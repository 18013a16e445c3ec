#!/bin/bash
# Sets up a fresh Debian 12 machine (as root) and runs the whole test suite:
# unit tests (cmocka via ctest), integration tests against real peers
# (pytest: redis-server, swaks, curl, smtplib), libFuzzer harnesses, and the
# unit and integration tests once more under AddressSanitizer and
# UndefinedBehaviorSanitizer.
#
# Environment: FUZZ_SECONDS (default 60) per fuzzer; SKIP_SANITIZE=1,
# SKIP_FUZZ=1 and SKIP_DOCKER=1 shorten a local run (CI runs everything).
# The Docker Compose test builds the images and brings the stack up with a
# Docker engine (scripts/docker-engine.sh starts a private one if none runs).
set -uo pipefail

top=$(cd "$(dirname "$0")/.." && pwd)
cd "$top"

"$top/scripts/setup.sh" || { echo "test: setup failed" >&2; exit 1; }

jobs=$(nproc 2>/dev/null || echo 2)
fuzz_seconds=${FUZZ_SECONDS:-60}
passed=0
failed=0
failures=()

step() {
    local name=$1; shift
    echo "==> $name"
    if "$@"; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        failures+=("$name")
        echo "==> FAILED: $name"
    fi
}

build() {
    local dir=$1; shift
    cmake -S "$top" -B "$dir" "$@" >/dev/null && cmake --build "$dir" -j"$jobs"
}

unit() {
    (cd "$1" && ctest --output-on-failure)
}

integration() {
    MAILFERRY_BIN="$1/mailferry" MAILFERRYCTL_BIN="$1/mailferryctl" \
        /usr/bin/python3 -m pytest -q -p no:cacheprovider "$top/tests/integration"
}

fuzz() {
    local dir=$1 ok=0
    for f in "$dir"/fuzz_*; do
        [ -x "$f" ] || continue
        local corpus; corpus=$(mktemp -d)
        echo "--- $(basename "$f") for ${fuzz_seconds}s"
        if ! "$f" -max_total_time="$fuzz_seconds" -print_final_stats=1 "$corpus" \
             > "$corpus.log" 2>&1; then
            tail -50 "$corpus.log"
            ok=1
        else
            grep -E 'stat::number_of_executed_units' "$corpus.log" || true
        fi
        rm -rf "$corpus" "$corpus.log"
    done
    return $ok
}

step "build" build "$top/build" -DCMAKE_BUILD_TYPE=RelWithDebInfo
step "unit tests" unit "$top/build"
step "integration tests" integration "$top/build"

if [ "${SKIP_FUZZ:-0}" != 1 ]; then
    step "fuzz build" build "$top/build-fuzz" -DCMAKE_C_COMPILER=clang -DMF_FUZZ=ON \
        -DCMAKE_BUILD_TYPE=Debug
    step "fuzzers" fuzz "$top/build-fuzz"
fi

if [ "${SKIP_DOCKER:-0}" != 1 ]; then
    step "docker compose" /usr/bin/python3 "$top/tests/docker/test_compose.py"
fi

if [ "${SKIP_SANITIZE:-0}" != 1 ]; then
    step "sanitizer build" build "$top/build-asan" -DMF_SANITIZE=ON -DCMAKE_BUILD_TYPE=Debug
    export ASAN_OPTIONS=detect_leaks=1:abort_on_error=0
    export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
    step "unit tests (asan+ubsan)" unit "$top/build-asan"
    step "integration tests (asan+ubsan)" integration "$top/build-asan"
fi

echo
for f in "${failures[@]}"; do echo "failed: $f"; done
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
