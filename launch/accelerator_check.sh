#!/usr/bin/env bash
# The accelerator check: fashion_jax on one GPU or TPU chip in <= 9 minutes, one JSON file.
#
#   launch/accelerator_check.sh IDX_DIR [OUTPUT.json] [--allow_cpu] [--option=value ...]
#
# Options (launch/accelerator_check.py's) may come anywhere, each as one word: --batch_sizes=128,512.
#
# Needs a preinstalled JAX stack for the chip (jax + its CUDA plugin or libtpu, flax, optax,
# orbax-checkpoint) and an IDX folder (pytest for its tests stage); no network. WHEELS=FOLDER installs ml-collections
# and tensorboardX (pure Python) from wheels in FOLDER first, without touching anything else;
# the folder and its files must be yours and writable by you alone (anyone who can write there
# would choose the code that runs). BUDGET_S: the time budget in seconds (default 540).
# PYTHON: the interpreter (default python3). Relative paths are read from where you run it.
# JAX_PLATFORMS=cpu (a CPU default left in the environment) is dropped: the check is for the
# chip, and exits 2 if JAX finds none. What it measures: launch/accelerator_check.py.
set -euo pipefail
usage_error() {
  echo "accelerator_check: error: $1" >&2
  exit 2
}
usage="usage: launch/accelerator_check.sh IDX_DIR [OUTPUT.json] [--allow_cpu]"
positional=() options=()  # Options may come anywhere (`IDX_DIR --allow_cpu` had written to a file of that name).
for arg in "$@"; do
  case $arg in
    # Paths from where you run it, as the positional ones (the script changes folder below).
    --output=* | --idx_dir=*) options+=("${arg%%=*}=$(realpath -m -- "${arg#*=}")") ;;
    --*) options+=("$arg") ;;
    *) positional+=("$arg") ;;
  esac
done
[ ${#positional[@]} -ge 1 ] || usage_error "IDX_DIR is missing; $usage"
[ ${#positional[@]} -le 2 ] || usage_error "unexpected argument '${positional[2]}'; $usage"
idx_dir=$(realpath -m -- "${positional[0]}")
output=$(realpath -m -- "${positional[1]:-accelerator_check.json}")
python=${PYTHON:-python3}
# Absolute, links kept: a venv's bin/python is a link to the base interpreter, and following it
# dropped the venv (its JAX, and WHEELS's install target) silently.
[[ $python != */* ]] || python=$(realpath -ms -- "$python")
command -v "$python" >/dev/null || usage_error "PYTHON=$python: no such command"
if [ -n "${WHEELS:-}" ]; then
  wheels=$(realpath -m -- "$WHEELS")
  [ -d "$wheels" ] || usage_error "WHEELS=$WHEELS is not a folder"
  unsafe=$(find "$wheels" -maxdepth 1 \( ! -user "$(id -u)" -o -perm /022 \) -print -quit)
  [ -z "$unsafe" ] || usage_error "WHEELS: $unsafe is not yours alone (another user owns it or \
can write to it); copy the wheels into a folder of your own (chmod go-w)"
  # Only that folder: pip merges find-links from PIP_FIND_LINKS and pip.conf files (a folder
  # anyone can write would win with a higher version); --isolated drops the variables,
  # PIP_CONFIG_FILE=/dev/null every configuration file.
  PIP_CONFIG_FILE=/dev/null "$python" -m pip --isolated install --quiet --no-index --no-deps \
    --find-links "$wheels" ml-collections tensorboardX
fi
# Found, not imported (JAX, flax and Orbax take ~2.5 s to import; an install that is there but
# broken fails the devices stage, which records its error).
missing=$("$python" -c "import importlib.util as u
def absent(name):
  try:
    return u.find_spec(name) is None
  except ImportError:  # (orbax.checkpoint without orbax.)
    return True
print(*[n for n in ('jax', 'flax', 'optax', 'orbax.checkpoint', 'ml_collections',
                    'tensorboardX') if absent(n)])") || missing="(unknown: the check itself failed, above)"
[ -z "$missing" ] || usage_error "a package is missing: $missing; install it, or pass WHEELS=FOLDER"
[ "${JAX_PLATFORMS:-}" != cpu ] || unset JAX_PLATFORMS
cd "$(dirname "$0")/.."
exec "$python" launch/accelerator_check.py --idx_dir="$idx_dir" --output="$output" \
  --budget_s="${BUDGET_S:-540}" ${options[@]+"${options[@]}"}
