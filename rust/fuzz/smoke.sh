#!/usr/bin/env bash
# Fuzz smoke test: builds every fuzz target of rust/fuzz and runs each for a while.
#
#   rust/fuzz/smoke.sh [SECONDS_PER_TARGET]      (default 60)
#
# Works on stable Rust: targets are built with `cargo fuzz --sanitizer none`, which passes no
# -Z flags (see README.md). Set FUZZ_SANITIZER=address to build with AddressSanitizer instead;
# that needs -Zsanitizer, so the script then sets RUSTC_BOOTSTRAP=1 for this build only.
# FUZZ_TARGETS="a b" runs a subset.
#
# Installs what a fresh Debian machine lacks (a C++ compiler for libFuzzer, cargo-fuzz), so it
# can run in CI as root from a clean clone. Exits non-zero if any target crashes, times out,
# runs out of memory or fails to build, printing each artifact and how to reproduce it.
set -euo pipefail

SECONDS_PER_TARGET="${1:-60}"
if ! [[ "$SECONDS_PER_TARGET" =~ ^[0-9]+$ ]] || [ "$SECONDS_PER_TARGET" -lt 1 ]; then
    echo "usage: $0 [SECONDS_PER_TARGET]" >&2
    exit 2
fi
SANITIZER="${FUZZ_SANITIZER:-none}"

FUZZ_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$FUZZ_DIR/../.." && pwd)"
cd "$REPO"
REL="${FUZZ_DIR#"$REPO"/}" # rust/fuzz, for the messages

log() { printf '==> %s\n' "$*"; }

# --- prerequisites -------------------------------------------------------------------------
export PATH="$HOME/.cargo/bin:$PATH"
if ! command -v cargo >/dev/null 2>&1; then
    echo "cargo not found: install a stable Rust toolchain (rustup) first" >&2
    exit 2
fi
# libfuzzer-sys compiles libFuzzer from C++ source with the `cc` crate, which runs `c++`
# (Debian's g++ package provides it).
if ! command -v c++ >/dev/null 2>&1 && [ -z "${CXX:-}" ]; then
    log "installing g++ (libFuzzer is built from C++ source)"
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    $SUDO apt-get update
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y --no-install-recommends g++
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    log "installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi
log "$(rustc --version), $(cargo fuzz --version)"

# The committed lockfile must be current (fails when pagehint-core gains a dependency:
# then run `cargo update -w --manifest-path rust/fuzz/Cargo.toml` and commit the result).
if ! cargo fetch --locked --manifest-path "$FUZZ_DIR/Cargo.toml" >/dev/null; then
    echo "$REL/Cargo.lock is out of date: run 'cargo update -w --manifest-path $REL/Cargo.toml'" >&2
    exit 1
fi

FUZZ_ARGS=(--fuzz-dir "$FUZZ_DIR" --sanitizer "$SANITIZER" --debug-assertions)
if [ "$SANITIZER" != "none" ]; then
    # Sanitizers other than none need -Zsanitizer=...: let stable rustc accept it.
    export RUSTC_BOOTSTRAP=1
    FUZZ_ARGS+=(--target-dir "$FUZZ_DIR/target/$SANITIZER")
fi

if [ -n "${FUZZ_TARGETS:-}" ]; then
    read -r -a TARGETS <<<"$FUZZ_TARGETS"
else
    mapfile -t TARGETS < <(cargo fuzz list --fuzz-dir "$FUZZ_DIR")
fi
if [ "${#TARGETS[@]}" -eq 0 ]; then
    echo "no fuzz targets found in $REL" >&2
    exit 1
fi

# --- build -----------------------------------------------------------------------------------
log "building ${TARGETS[*]} (sanitizer: $SANITIZER)"
start=$(date +%s)
for t in "${TARGETS[@]}"; do
    cargo fuzz build "${FUZZ_ARGS[@]}" "$t"
done
log "built in $(($(date +%s) - start)) s"

# --- run -------------------------------------------------------------------------------------
LOGS="$FUZZ_DIR/target/smoke-logs"
mkdir -p "$LOGS"
failed=()
summary=()
for t in "${TARGETS[@]}"; do
    corpus="$FUZZ_DIR/corpus/$t"
    artifacts="$FUZZ_DIR/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    # Seeds: an empty input and a few fixed patterns (libFuzzer grows the rest).
    [ -n "$(ls -A "$corpus")" ] || {
        : >"$corpus/seed-empty"
        head -c 64 /dev/zero >"$corpus/seed-zeros"
        head -c 256 /dev/zero | tr '\0' '\377' >"$corpus/seed-ones"
        printf '\001\002\003\004\005\006\007\010%.0s' $(seq 1 32) >"$corpus/seed-steps"
    }
    marker="$LOGS/$t.start"
    touch "$marker"
    log "fuzzing $t for ${SECONDS_PER_TARGET} s (corpus $REL/corpus/$t: $(find "$corpus" -type f | wc -l) inputs)"
    set +e
    cargo fuzz run "${FUZZ_ARGS[@]}" "$t" "$corpus" -- \
        -max_total_time="$SECONDS_PER_TARGET" -max_len=8192 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="$artifacts/" >"$LOGS/$t.log" 2>&1
    rc=$?
    set -e
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$LOGS/$t.log" | tail -1 || true)
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$LOGS/$t.log" | tail -1 || true)
    cov=$(grep -oE 'cov: [0-9]+ ft: [0-9]+ corp: [0-9]+' "$LOGS/$t.log" | tail -1 || true)
    found=$(find "$artifacts" -type f -newer "$marker" 2>/dev/null | sort || true)
    if [ "$rc" -ne 0 ] || [ -n "$found" ]; then
        failed+=("$t")
        summary+=("$(printf '%-12s FAILED (exit %s) after %s execs' "$t" "$rc" "${execs:-?}")")
        echo "---- $t failed; last lines of $LOGS/$t.log:"
        grep -v -E '^"|# Uses:' "$LOGS/$t.log" | tail -40 || true
        echo "----"
        if [ -n "$found" ]; then
            for a in $found; do
                echo "artifact: ${a#"$REPO"/}"
                echo "  reproduce: cargo fuzz run --fuzz-dir $REL --sanitizer $SANITIZER -a $t ${a#"$REPO"/}"
                echo "  minimize:  cargo fuzz tmin --fuzz-dir $REL --sanitizer $SANITIZER -a $t ${a#"$REPO"/}"
            done
            if [ "$SANITIZER" != "none" ]; then
                echo "  (with RUSTC_BOOTSTRAP=1 and --target-dir $REL/target/$SANITIZER)"
            fi
        fi
    else
        summary+=("$(printf '%-12s ok: %s execs, %s exec/s, %s' "$t" "${execs:-?}" "${rate:-?}" "${cov:-}")")
    fi
done

log "summary (${SECONDS_PER_TARGET} s per target, logs in ${LOGS#"$REPO"/})"
printf '    %s\n' "${summary[@]}"
if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzzing found problems in: ${failed[*]}" >&2
    exit 1
fi
