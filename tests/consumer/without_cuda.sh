#!/usr/bin/env bash
# Configures, builds and runs the consumer project against an install of fusedopt with the
# CUDA toolkit hidden: an empty tmpfs over the toolkit's directory in a private mount
# namespace, so neither CMake nor the loader can find anything of it. A CPU-only user of a
# CUDA-enabled fusedopt must need nothing from CUDA: no find_package(CUDAToolkit), no CUDA
# library at link or at run time.
#
#   tests/consumer/without_cuda.sh CUDA_ROOT INSTALL_PREFIX README_EXAMPLE BUILD_DIR
set -euo pipefail
if [ "${1:-}" != "--hidden" ]; then
  cuda_root=$(readlink -f "$1")
  as_root=()
  [ "$(id -u)" -ne 0 ] && as_root=(--map-root-user)
  # shellcheck disable=SC2016  # "$1" and "$@" belong to the inner shell
  exec unshare "${as_root[@]}" --mount -- \
    bash -ec 'mount -t tmpfs tmpfs "$1" && shift && exec "$@"' bash "$cuda_root" \
    "$0" --hidden "$cuda_root" "${@:2}"
fi
cuda_root=$2 prefix=$3 example=$4 build=$5

test ! -e "$cuda_root/bin/nvcc"
for lib in $(ldconfig -p | grep -o '/[^ ]*libcuda[^ ]*' || true); do
  if [ -e "$lib" ]; then echo "not hidden: $lib"; exit 1; fi
done

cmake -S "$(dirname "$0")" -B "$build" -DCMAKE_PREFIX_PATH="$prefix" \
  -DREADME_EXAMPLE="$example" -DCMAKE_BUILD_TYPE=Release > /dev/null
cmake --build "$build" -j2 > /dev/null
"$build/readme_example"
"$build/c_consumer"
if readelf -d "$build/readme_example" "$build/c_consumer" | grep NEEDED | grep -i 'libcu'; then
  echo "the consumer needs a CUDA library"
  exit 1
fi
echo "configured, built and ran with $cuda_root hidden; needs no CUDA library"
