# Steps of an unattended check script (sourced by memory_check.sh and train_check.sh): each step
# runs under a time limit with its output in the log and on the terminal, and is counted as
# passed, skipped (exit 77) or failed; a failed step does not stop the others. The caller sets
# NAME (the log's prefix) and LOG (the log file), and ends with `finish`.

say() { echo "$NAME: $*" | tee -a "$LOG"; }

failed=() skipped=() passed=()
# step NAME TIMEOUT_S COMMAND...: runs it with its output into the log (and on the terminal),
# records how it ended and how long it took; returns its status.
step() {
  local name=$1 limit=$2
  shift 2
  say "=== $name: $*"
  local t0 rc ms
  t0=$(date +%s%N)
  timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  ms=$(( ($(date +%s%N) - t0) / 1000000 ))
  local took="$((ms / 1000)).$(printf %03d $((ms % 1000))) s"
  case "$rc" in
    0) passed+=("$name"); say "=== $name: ok in $took" ;;
    77) skipped+=("$name"); say "=== $name: SKIPPED (exit 77) in $took" ;;
    124) failed+=("$name"); say "=== $name: TIMED OUT after $limit s" ;;
    *) failed+=("$name"); say "=== $name: FAILED (exit $rc) in $took" ;;
  esac
  return "$rc"
}
# Information only: logged, never counted as a failure.
info() { say "--- $*"; timeout 30 "$@" 2>&1 | tee -a "$LOG"; }
# A step that cannot run because one it needs failed.
not_run() { failed+=("$1"); say "=== $1: not run ($2)"; }

# Unpacks .gpu-debs/*.deb (Debian packages the GPU machines lack, bench/gpu/fetch-debs) into the
# prefix $1 and points CMake, the loader and PATH at it: sets PREFIX_ARGS. Nothing when the
# folder is absent.
PREFIX_ARGS=()
unpack_debs() {
  local root=$1
  if ! { [ -d .gpu-debs ] && ls .gpu-debs/*.deb > /dev/null 2>&1; }; then
    say "no .gpu-debs/*.deb: using the development packages already installed, if any"
    return 0
  fi
  mkdir -p "$root"
  PREFIX_ARGS=(-DCMAKE_PREFIX_PATH="$root/usr")
  export LD_LIBRARY_PATH="$root/usr/lib/x86_64-linux-gnu${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  export PATH="$root/usr/bin:$PATH"
  step unpack-debs 120 bash -c \
    'for f in .gpu-debs/*.deb; do echo "dpkg -x $f $0"; dpkg -x "$f" "$0" || exit 1; done' "$root"
}

# Logs the counts and exits: 0 when every step passed, 77 when none failed but one was skipped,
# else 1.
finish() {
  say "passed: ${passed[*]:-none}"
  say "skipped: ${skipped[*]:-none}"
  say "failed: ${failed[*]:-none}"
  say "finished $(date -u +%FT%TZ)"
  if [ ${#failed[@]} -gt 0 ]; then exit 1; fi
  if [ ${#skipped[@]} -gt 0 ]; then exit 77; fi
  exit 0
}
