// host/src/cuda/schedule.cu compiled as host C++ for the host emulation of the CUDA kernels
// (FO_CUDA_HOST_EMULATION, set on this target; docs/host-emulation.md).
#include "cuda/schedule.cu"
