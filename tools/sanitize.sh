#!/usr/bin/env bash
# Build the runtime with AddressSanitizer + UBSan (-DBABYRT_SANITIZE=ON) and run the C++-facing
# tests against it. The instrumented libbabyrt/_C replace the installed ones through PYTHONPATH;
# the ASan runtime is preloaded into the (uninstrumented) Python. Leak checking is off: CPython
# and libtorch keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
py=${PYTHON:-python3}
build=build/asan
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DBABYRT_SANITIZE=ON \
  -DPython_EXECUTABLE="$(command -v "$py")" >/dev/null
cmake --build "$build"
site=$(mktemp -d)
cp -r python/babyrt "$site/babyrt"
cp -r training "$site/babyrt/training"
cp "$build"/libbabyrt.so "$build"/_C*.so "$site/babyrt/"
export PYTHONPATH=$site
export LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)"
export ASAN_OPTIONS=detect_leaks=0:halt_on_error=1:abort_on_error=1
export UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1
cd "$site"
"$py" -c "import babyrt, sys; assert babyrt.__file__.startswith('$site'), babyrt.__file__"
if [ $# -eq 0 ]; then
  set -- "$repo"/tests/test_tokenizer.py "$repo"/tests/test_artifact.py \
         "$repo"/tests/test_generate.py "$repo"/tests/test_parity.py
fi
"$py" -m pytest -q -p no:cacheprovider --rootdir "$repo" "$@"
