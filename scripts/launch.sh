# Sourced by the *_train.sh scripts: `launch SCRIPT ARGS...` runs a script of the repository root with python, or,
# with NUM_GPUS > 1, on that many GPUs through `accelerate launch` (data parallel; TRL and Unsloth support it).
# PYTHON=interpreter replaces `python`.
REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
launch() {
    local script="$REPO_ROOT/$1"; shift
    if [ "${NUM_GPUS:-1}" -gt 1 ]; then
        accelerate launch --num_processes "$NUM_GPUS" "$script" "$@"
    else
        "${PYTHON:-python}" "$script" "$@"
    fi
}
