# Sourced by launch/smoke.sh and launch/test.sh: creates .venv and installs the project into it.
# Idempotent: a second run with an unchanged pyproject.toml only activates the venv.
#
#   VENV=path        where the virtual environment lives (default: .venv in the repo root)
#   PYTHON=python3   the interpreter the venv is made from
#   TORCH_SPEC=...   what to install as torch when none is importable
#                    (default: torch==2.13.0 on a machine without an NVIDIA GPU, else torch)
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO_ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

if ! command -v "$PYTHON" >/dev/null 2>&1; then
    echo "setup: '$PYTHON' not found; set PYTHON=/path/to/python3 (3.10 or newer)" >&2
    exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)'; then
    echo "setup: $("$PYTHON" --version 2>&1) is too old; recurrent-pretrain needs Python >= 3.10 (set PYTHON=...)" >&2
    exit 1
fi

if [ ! -x "$VENV/bin/python" ]; then
    # Reuse a torch that is already installed (a cluster module, a container image) rather than
    # downloading another one: the venv then sees the system site-packages.
    if "$PYTHON" -c 'import torch' >/dev/null 2>&1; then
        echo "setup: creating $VENV (reusing the installed torch $("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        echo "setup: creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
# shellcheck disable=SC1091
source "$VENV/bin/activate"

# pip, minus the machine-specific "Location ... is ignored" noise some pip.conf setups print.
pip_install() {
    python -m pip install -q "$@" 2>&1 | { grep -v -e 'is ignored: it is neither a file nor a directory' -e 'BuildBackendWarning' || true; }
}

stamp="$VENV/.recurrent-pretrain-installed"
want="$(cat "$REPO_ROOT/pyproject.toml" "$REPO_ROOT/launch/setup_env.sh" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    export PIP_DISABLE_PIP_VERSION_CHECK=1
    pip_install --upgrade pip setuptools wheel
    if ! python -c 'import torch' >/dev/null 2>&1; then
        if [ -z "${TORCH_SPEC:-}" ]; then
            if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
                TORCH_SPEC="torch"
            else
                TORCH_SPEC="torch==2.13.0"   # the CPU build; never the multi-GB CUDA one here
            fi
        fi
        echo "setup: installing $TORCH_SPEC"
        pip_install "$TORCH_SPEC"
    fi
    echo "setup: installing recurrent-pretrain and its dependencies"
    # --no-build-isolation: deepspeed's setup.py imports torch; an isolated build environment
    # would download the newest (CUDA) torch just to build it.
    pip_install --no-build-isolation -e "$REPO_ROOT[test]"
    echo "$want" > "$stamp"
fi
cd "$REPO_ROOT"
