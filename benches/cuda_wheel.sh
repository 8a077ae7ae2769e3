#!/usr/bin/env bash
# Builds a CUDA wheel of florence2-rs on a machine with no GPU and no CUDA install, for a GPU machine that has
# the NVIDIA driver and the CUDA 13 libraries (torch's cu13 wheels bring them):
#
#     bash benches/cuda_wheel.sh WORK_DIR [COMPUTE_CAP]     # default compute capability 90 (H100/H200)
#
# The CUDA 13.0 toolkit comes from NVIDIA's pip wheels, unpacked into WORK_DIR/cuda (13.0 because a 580 driver
# loads PTX up to 13.0; newer toolkits write PTX it rejects). libcuda.so.1 belongs to the driver, which this
# machine lacks: a stub with that SONAME satisfies the linker, and the real one is loaded on the GPU machine.
# The wheel lands in WORK_DIR/wheels; the first build takes ~9 minutes on 2 cores (candle's kernels).
set -euo pipefail
work=$(realpath -m "${1:?usage: cuda_wheel.sh WORK_DIR [COMPUTE_CAP]}")
cap=${2:-90}
root=$(cd "$(dirname "$0")/.." && pwd)
cuda=$work/cuda/nvidia/cu13
mkdir -p "$work/pip"
if [ ! -x "$cuda/bin/nvcc" ]; then
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$work/pip" \
        nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-cccl==13.0.85 \
        nvidia-cuda-runtime==13.0.96 nvidia-cuda-nvrtc==13.0.88 nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
    for wheel in "$work"/pip/*.whl; do python3 -m zipfile -e "$wheel" "$work/cuda"; done
    chmod +x "$cuda"/bin/* "$cuda"/nvvm/bin/*
fi
# Unversioned names for the linker, and the driver stub.
for lib in cublas cublasLt nvrtc curand cudart; do
    ln -sf "$(basename "$(ls "$cuda"/lib/lib$lib.so.* | head -1)")" "$cuda/lib/lib$lib.so"
done
echo 'void florence2_libcuda_stub(void) {}' > "$work/stub.c"
cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$cuda/lib/libcuda.so" "$work/stub.c"

export CUDA_HOME=$cuda CUDA_ROOT=$cuda CUDA_PATH=$cuda PATH=$cuda/bin:$PATH CUDA_COMPUTE_CAP=$cap
export CARGO_TARGET_DIR=$work/target
cd "$root"
# --no-as-needed keeps libcuda.so.1 among the needed libraries although the stub defines none of its symbols.
maturin build --release --features python,cuda --auditwheel skip -o "$work/wheels" -- \
    -Clink-arg=-L"$cuda/lib" -Clink-arg=-Wl,--no-as-needed -Clink-arg=-lcuda
