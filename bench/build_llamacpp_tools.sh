#!/usr/bin/env bash
# Bench prerequisite: llama.cpp's llama-quantize, llama-imatrix and llama-perplexity (CPU build),
# from the llama.cpp source vendored in the llama-cpp-python sdist (so the tools match the library
# the llamacpp bench measures). Binaries land in .tools/llama.cpp/bin/ (git-ignored):
#   nice -n 19 bash bench/build_llamacpp_tools.sh
# Idempotent: a finished build (all three binaries + the stamp naming this version) is skipped.
# Needs cmake, a C and C++ compiler and pip (network for the one sdist download). JOBS=2 by default.
set -euo pipefail
case $0 in */*) here=${0%/*} ;; *) here=. ;; esac
cd "$here/.."

VERSION=0.3.36
TOOLS=.tools/llama.cpp
BIN=$TOOLS/bin
STAMP=$TOOLS/BUILT
TARGETS=(llama-quantize llama-imatrix llama-perplexity)
PYTHON=${PYTHON:-python3}
JOBS=${JOBS:-2}

die() { echo "build_llamacpp_tools: $*" >&2; exit 1; }

built() {
  [ -f "$STAMP" ] && grep -qx "llama-cpp-python $VERSION" "$STAMP" || return 1
  for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || return 1; done
}

if built; then
  echo "llama.cpp tools already built in $BIN ($(sed -n 2p "$STAMP")); nothing to do"
  exit 0
fi

for tool in cmake cc c++; do
  command -v "$tool" >/dev/null || die "$tool not found: install cmake and gcc/g++ (e.g. apt-get install cmake build-essential)"
done
"$PYTHON" -m pip --version >/dev/null 2>&1 || die "$PYTHON has no pip: set PYTHON to a python with pip"

start=$(date +%s)
mkdir -p "$TOOLS"
sdist=$(ls "$TOOLS"/sdist/llama_cpp_python-$VERSION.tar.gz 2>/dev/null || true)
if [ -z "$sdist" ]; then
  "$PYTHON" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$TOOLS/sdist" \
    || die "pip download of the llama-cpp-python $VERSION sdist failed"
  sdist=$(ls "$TOOLS"/sdist/llama_cpp_python-$VERSION.tar.gz)
fi
src=$TOOLS/src/llama_cpp_python-$VERSION/vendor/llama.cpp
if [ ! -f "$src/CMakeLists.txt" ]; then
  rm -rf "$TOOLS/src" && mkdir -p "$TOOLS/src"
  tar -xzf "$sdist" -C "$TOOLS/src"
  [ -f "$src/CMakeLists.txt" ] || die "$sdist has no vendor/llama.cpp/CMakeLists.txt"
fi
# The sdist carries its git metadata: the submodule's HEAD is the llama.cpp commit built here.
head=$TOOLS/src/llama_cpp_python-$VERSION/.git/modules/vendor/llama.cpp/HEAD
commit=$(head -c 9 "$head" 2>/dev/null || echo unknown)

# Static libraries (the binaries need nothing beside them), no OpenSSL (the tools read local files),
# CPU only; GGML_NATIVE stays at its default (on: built for this machine's CPU).
cmake -S "$src" -B "$TOOLS/build" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=OFF \
  -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
  -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TOOLS=ON -DGGML_CUDA=OFF -DGGML_METAL=OFF >"$TOOLS/cmake-configure.log" 2>&1 \
  || die "cmake configure failed; see $TOOLS/cmake-configure.log"
cmake --build "$TOOLS/build" --config Release -j "$JOBS" --target "${TARGETS[@]}" >"$TOOLS/cmake-build.log" 2>&1 \
  || die "cmake build failed; see $TOOLS/cmake-build.log"

mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do
  cp "$TOOLS/build/bin/$t" "$BIN/$t.tmp" && mv "$BIN/$t.tmp" "$BIN/$t"
done
printf 'llama-cpp-python %s\nllama.cpp %s\n' "$VERSION" "$commit" >"$STAMP"
end=$(date +%s)
echo "built ${TARGETS[*]} (llama.cpp $commit from llama-cpp-python $VERSION) in $BIN: $((end - start)) s wall, $(uptime | sed 's/.*load average/load average/')"
