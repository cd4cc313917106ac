# Sourced by .ci/run. `step CMD...` runs CMD as a job of its own (its own process group) and waits for it, so a
# TERM or INT sent to the script (a CI job's timeout) stops the step's whole process tree and waits for it before
# the script exits: run in the foreground, `zone bench` went on for ~30 s after the script had gone.
set -m  # job control: each background job in a process group of its own

step_group=""

stop_step() {
    trap - TERM INT
    if [[ -n $step_group ]]; then
        kill -TERM -- "-$step_group" 2>/dev/null || true
        wait "$step_group" 2>/dev/null || true
        # `wait` is for the step's own process: a child it left still stopping outlived the script by seconds.
        # Wait for the whole group (30 s at most), then kill what is left of it.
        local tenths=0
        while kill -0 -- "-$step_group" 2>/dev/null && ((tenths++ < 300)); do sleep 0.1; done
        kill -KILL -- "-$step_group" 2>/dev/null || true
    fi
    exit "$1"
}

trap 'stop_step 143' TERM
trap 'stop_step 130' INT

step() {
    "$@" &
    step_group=$!
    local status=0
    wait "$step_group" || status=$?
    step_group=""
    return "$status"
}
