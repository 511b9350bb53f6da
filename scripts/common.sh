# Shared by the run scripts (sourced).

# wait_until TRIES PID LOG WHAT CMD...: runs CMD every 0.1 s until it succeeds;
# gives up (showing the end of LOG) when PID exits or after TRIES attempts.
wait_until() {
  local tries=$1 pid=$2 log=$3 what=$4
  shift 4
  for _ in $(seq 1 "$tries"); do
    "$@" >/dev/null 2>&1 && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "$what did not start; see $log:"; tail -20 "$log"; exit 1
    fi
    sleep 0.1
  done
  echo "$what is not ready after $((tries / 10)) s; see $log:"; tail -20 "$log"; exit 1
}
