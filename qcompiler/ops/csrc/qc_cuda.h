// Host entry points of the CUDA kernels (qc_cuda.cu), callable from C++ and ctypes.
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// Per-token W8A8 GEMM (optionally outlier-split) on device buffers, launched on `stream`
// (a cudaStream_t, or null for the default stream).
//   dtype: 1 = float32 A/Y, 10 = float16 A/Y, 16 = bfloat16 A/Y (ONNX element type numbers)
//   A [M, K], B int8 [N, K], b_scale [N], bias [N] or null,
//   oidx int64 [R] and B_out float [R, N] (R = 0: plain per-token GEMM), Y [M, N].
// Returns 0, or a CUDA error code with a message in err.
int qc_cuda_w8a8_gemm(int dtype, const void* A, const int8_t* B, const float* b_scale, const float* bias,
                      const int64_t* oidx, int64_t R, const float* B_out, void* Y, int64_t M, int64_t K,
                      int64_t N, void* stream, char* err, size_t err_len);

// Number of CUDA devices (0 without a driver/GPU); negative on error with a message.
int qc_cuda_device_count(char* err, size_t err_len);

// Same GEMM on host buffers: copies in, runs `warmup` + `iters` launches, copies Y out and
// writes the mean time of one launch in microseconds to *usec.  For tests and benchmarks.
int qc_cuda_w8a8_gemm_host(int dtype, const void* A, const int8_t* B, const float* b_scale, const float* bias,
                           const int64_t* oidx, int64_t R, const float* B_out, void* Y, int64_t M, int64_t K,
                           int64_t N, int warmup, int iters, double* usec, char* err, size_t err_len);

#ifdef __cplusplus
}
#endif
