#!/usr/bin/env bash
# Download the wheels of deploy/gpu_wheels.txt into .whl/ (git-ignored) for the lent GPU machine:
# CPython 3.12 on x86-64 Linux, each wheel alone (--no-deps: the list already names the closure).
# Run from anywhere; needs pip and the package registry. A device call then carries ".whl" and
# installs them with `pip install --no-index --no-deps --target` (benchmarks/gpu_endpoint.py).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="$repo/.whl"
python="${PYTHON:-python3}"
mkdir -p "$dest"
platforms=(manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
fallbacks=(manylinux_2_24_x86_64 manylinux_2_31_x86_64 manylinux_2_34_x86_64 manylinux_2_35_x86_64)

download() {  # download REQUIREMENT [EXTRA-PLATFORM ...]
    local requirement="$1"; shift
    local args=()
    for p in "${platforms[@]}" "$@"; do args+=(--platform "$p"); done
    "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        "${args[@]}" -d "$dest" "$requirement"
}

grep -v '^\s*\(#\|$\)' "$repo/deploy/gpu_wheels.txt" | while read -r requirement; do
    download "$requirement" 2>/dev/null || download "$requirement" "${fallbacks[@]}"
done
# One version of each package: two would stop the whole install on the device.
count=$(ls "$dest"/*.whl | wc -l)
names=$(ls "$dest"/*.whl | xargs -n1 basename | cut -d- -f1 | sort | uniq -d)
if [[ -n "$names" ]]; then
    echo "more than one wheel of: $names (empty $dest and run again)" >&2
    exit 1
fi
echo "$count wheels, $(du -sh "$dest" | cut -f1) in $dest"
