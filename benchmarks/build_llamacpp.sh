#!/bin/sh
# llama-cpp-python from source (its vendored llama.cpp, CPU, -march=native) into VENV, for bench_peers.py.
#   benchmarks/build_llamacpp.sh VENV CONSTRAINTS
# GCC 12 drops the stores that fill the AMX tile configuration before `_tile_loadconfig(&tc)` in
# ggml-cpu/amx/mmq.cpp (the builtin is not seen to read them), so the first AMX tile load faults; a compiler
# barrier before it keeps them. ~15 min on 2 cores; the build runs under nice.
set -eu
VENV=$1
CONSTRAINTS=$2
VERSION=$(sed -n 's/^llama-cpp-python==//p' "$CONSTRAINTS")
SRC="$VENV/src"
rm -rf "$VENV"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q -c "$CONSTRAINTS" pip
mkdir -p "$SRC"
"$VENV/bin/pip" download -q --no-deps --no-binary :all: -d "$SRC" "llama-cpp-python==$VERSION"
tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
TREE="$SRC/llama_cpp_python-$VERSION"
MMQ="$TREE/vendor/llama.cpp/ggml/src/ggml-cpu/amx/mmq.cpp"
grep -q '    _tile_loadconfig(&tc);' "$MMQ"
sed -i 's|^    _tile_loadconfig(&tc);|    __asm__ __volatile__("" ::: "memory");  /* GCC 12: keep the stores to tc */\n    _tile_loadconfig(\&tc);|' "$MMQ"
grep -q '__asm__ __volatile__("" ::: "memory")' "$MMQ"
CMAKE_ARGS="-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF" \
CMAKE_BUILD_PARALLEL_LEVEL=2 PIP_CONSTRAINT="$(realpath "$CONSTRAINTS")" \
    nice -n 19 "$VENV/bin/pip" install -q -c "$CONSTRAINTS" "$TREE"
"$VENV/bin/python" -c "import llama_cpp; print('llama-cpp-python', llama_cpp.__version__, llama_cpp.llama_print_system_info().decode())"
