#!/usr/bin/env bash
# Fill wheels/gpu-py312/ with every wheel that benchmarks/gpu_check.sh installs on a lent GPU
# machine: CPython 3.12, x86-64, CUDA torch preinstalled, no network. Run it here (PyPI
# reachable); the folder is git-ignored and travels to that machine as a carried path.
#
# What goes in: hybridfc's install_requires and test extra (setup.cfg), DeepSpeed's own
# requirements, setuptools and wheel (the editable install builds with them, without isolation),
# pip (runnable from its wheel where the machine's python has none), and their dependencies,
# resolved for CPython 3.12 manylinux and held at the versions of .venv (the ones the CPU suite
# passes with). Never torch or NVIDIA's CUDA libraries: the machine's CUDA build must stay.
# DeepSpeed ships only an sdist, so its wheel is built here, pure Python (DS_BUILD_OPS=0).
#
# Idempotent: the set is assembled in a staging folder and replaces the old one only when
# complete; the DeepSpeed wheel of the same version is reused instead of rebuilt.
#
#     bash benchmarks/gpu_wheels.sh          # PYTHON=... to use another build interpreter
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEST=wheels/gpu-py312
LIMIT_MIB=64  # what the device tool carries, all carried paths together
TARGET=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64)

mkdir -p wheels
stage=$(mktemp -d wheels/.gpu-py312.XXXXXX)
trap 'rm -rf "$stage"' EXIT

# ----------------------------------------------------------------------------- DeepSpeed
ds_version=$("$PYTHON" - <<'PY'
import configparser, importlib.metadata as md
from packaging.requirements import Requirement

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
pinned = next(Requirement(line) for line in cfg["options"]["install_requires"].split()
              if line.startswith("deepspeed"))
version = md.version("deepspeed")
if version not in pinned.specifier:
    raise SystemExit(f"deepspeed {version} of the build interpreter is outside setup.cfg's {pinned}")
print(version)
PY
)
ds_wheel=$(ls "$DEST"/deepspeed-"$ds_version"-*.whl 2>/dev/null | head -n 1 || true)
if [[ -n "$ds_wheel" ]]; then
    echo "reusing $ds_wheel"
    cp "$ds_wheel" "$stage"/
else
    echo "building deepspeed $ds_version (pure Python, no ops)"
    # --no-build-isolation: DeepSpeed's setup.py imports torch; the build interpreter's CPU
    # torch serves, and --no-deps keeps pip from fetching any torch at all.
    DS_BUILD_OPS=0 "$PYTHON" -m pip wheel --quiet --no-deps --no-build-isolation \
        "deepspeed==$ds_version" -w "$stage"
fi

# ----------------------------------------------------------------------------- requirements
# One requirement a line: setup.cfg's (torch and DeepSpeed left out: the machine's torch, the
# wheel above), DeepSpeed's unconditional ones (torch left out), pytest, the build backend, pip.
"$PYTHON" - >"$stage/requirements.txt" <<'PY'
import configparser, importlib.metadata as md
from packaging.requirements import Requirement

TARGET = {"python_version": "3.12", "python_full_version": "3.12.0", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
          "platform_python_implementation": "CPython", "os_name": "posix", "extra": ""}
SKIP = {"torch", "deepspeed"}

cfg = configparser.ConfigParser()
cfg.read("setup.cfg")
lines = cfg["options"]["install_requires"].split() + cfg["options.extras_require"]["test"].split()
lines += md.requires("deepspeed") or []
lines += ["setuptools>=68", "wheel", "pip"]
seen = set()
for line in lines:
    req = Requirement(line)
    if req.name.lower() in SKIP or (req.marker and not req.marker.evaluate(TARGET)) or str(req) in seen:
        continue
    seen.add(str(req))
    print(req)
PY
# Hold every package at its .venv version where .venv has it (the CPU suite's tested set).
"$PYTHON" -m pip freeze --exclude-editable | grep -viE '^(torch|hybridfc|deepspeed)[=@ ]' >"$stage/constraints.txt"
echo "requirements: $(paste -sd ' ' "$stage/requirements.txt")"

"$PYTHON" -m pip download --quiet "${TARGET[@]}" --dest "$stage" \
    -r "$stage/requirements.txt" -c "$stage/constraints.txt"

# ----------------------------------------------------------------------------- checks
forbidden=$(cd "$stage" && ls ./*.whl | grep -iE '^\./(torch|triton|nvidia_)' | grep -viE '^\./nvidia_ml_py' || true)
if [[ -n "$forbidden" ]]; then
    echo "error: the set would replace the machine's CUDA torch: $forbidden" >&2
    exit 1
fi
rm -rf "$DEST"
mv "$stage" "$DEST"
trap - EXIT

size_mib=$(du -sm "$DEST" | cut -f1)
echo
ls -1 "$DEST"
echo "$DEST: $(ls "$DEST"/*.whl | wc -l) wheels, $(du -sh "$DEST" | cut -f1) (limit of the carried paths: ${LIMIT_MIB} MiB)"
if (( size_mib >= LIMIT_MIB * 3 / 4 )); then
    echo "warning: ${size_mib} MiB leaves little room under ${LIMIT_MIB} MiB; faiss-cpu and numpy are the big ones" >&2
fi
