// CUDA kernels of qcompiler's ops: per-token W8A8 GEMM with the activation quantization
// fused in, int8 tensor-core MMA (WMMA m16n16k16, int32 accumulation) and dequantization
// (row scale x column scale, + outlier side path, + bias) in the epilogue.  sm_80 / sm_90.
//
// One thread block computes a BM x BN tile of Y:
//   1. row scales: each warp reduces max |A[m, k]| over its rows (outlier channels, marked
//      in a shared bitmask, are skipped); s[m] = max(amax, 1e-8) / 127, as on the CPU;
//   2. K loop, BK = 64 per stage: A is read as float/half/bfloat16, quantized in registers
//      (q = clip(rint(A / s), -127, 127), outlier channels -> 0) and stored as int8 in
//      shared memory; B (int8 [N, K], K contiguous) is copied 16 bytes at a time when K
//      allows; every warp runs FM x FN WMMA tiles;
//   3. epilogue: accumulators go through shared memory; each thread writes
//      Y = acc * s[m] * b_scale[n] + sum_j A[m, idx[j]] * B_out[j, n] + bias[n].
// Tiles are stored as k16 slabs ([BK/16][rows][16]) so every WMMA pointer is 32-byte
// aligned and ldm = 16 bytes for any K (odd K is zero-padded in shared memory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>
#include <stdint.h>
#include <stdio.h>

#include "qc_cuda.h"

namespace {

using namespace nvcuda;

constexpr int kBK = 64;
constexpr int kSlabs = kBK / 16;

template <typename T>
__device__ __forceinline__ float load_f(const T* p);
template <>
__device__ __forceinline__ float load_f<float>(const float* p) { return __ldg(p); }
template <>
__device__ __forceinline__ float load_f<__half>(const __half* p) { return __half2float(__ldg(p)); }
template <>
__device__ __forceinline__ float load_f<__nv_bfloat16>(const __nv_bfloat16* p) { return __bfloat162float(__ldg(p)); }

template <typename T>
__device__ __forceinline__ T store_f(float v);
template <>
__device__ __forceinline__ float store_f<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half store_f<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 store_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

__device__ __forceinline__ bool is_outlier(const uint32_t* mask, int64_t k) {
  return mask != nullptr && ((mask[k >> 5] >> (k & 31)) & 1u);
}

template <typename T, int WARPS_M, int WARPS_N, int FM, int FN>
__global__ void __launch_bounds__(WARPS_M * WARPS_N * 32)
    w8a8_gemm_kernel(const T* __restrict__ A, const int8_t* __restrict__ B, const float* __restrict__ b_scale,
                     const float* __restrict__ bias, const int64_t* __restrict__ oidx, int R,
                     const float* __restrict__ B_out, T* __restrict__ Y, int M, int K, int N, bool vec_b) {
  constexpr int BM = WARPS_M * FM * 16;
  constexpr int BN = WARPS_N * FN * 16;
  constexpr int THREADS = WARPS_M * WARPS_N * 32;
  __shared__ __align__(128) int8_t As[kSlabs][BM][16];
  __shared__ __align__(128) int8_t Bs[kSlabs][BN][16];
  __shared__ __align__(128) int32_t Cs[BM][BN];
  __shared__ float s_row[BM];
  extern __shared__ uint32_t mask_words[];  // (K + 31) / 32 words when R > 0

  const int tid = threadIdx.x;
  const int warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / WARPS_N, warp_n = warp % WARPS_N;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;

  const uint32_t* mask = nullptr;
  if (R > 0) {
    const int words = (K + 31) / 32;
    for (int w = tid; w < words; w += THREADS) mask_words[w] = 0u;
    __syncthreads();
    for (int j = tid; j < R; j += THREADS) {
      const int64_t k = oidx[j];
      if (k >= 0 && k < K) atomicOr(&mask_words[k >> 5], 1u << (k & 31));
    }
    mask = mask_words;
  }
  __syncthreads();

  // 1. per-row scales
  for (int r = warp; r < BM; r += THREADS / 32) {
    const int64_t m = m0 + r;
    float amax = 0.f;
    if (m < M) {
      const T* a = A + m * K;
      for (int64_t k = lane; k < K; k += 32)
        if (!is_outlier(mask, k)) amax = fmaxf(amax, fabsf(load_f<T>(a + k)));
    }
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (lane == 0) s_row[r] = fmaxf(amax, 1e-8f) / 127.0f;
  }
  __syncthreads();

  wmma::fragment<wmma::accumulator, 16, 16, 16, int> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0);

  // 2. main loop
  for (int64_t k0 = 0; k0 < K; k0 += kBK) {
    for (int e = tid; e < BM * kBK; e += THREADS) {
      const int r = e / kBK, kk = e % kBK;
      const int64_t m = m0 + r, k = k0 + kk;
      int8_t q = 0;
      if (m < M && k < K && !is_outlier(mask, k)) {
        float v = load_f<T>(A + m * K + k) / s_row[r];
        v = fminf(fmaxf(v, -127.0f), 127.0f);
        q = int8_t(__float2int_rn(v));
      }
      As[kk / 16][r][kk % 16] = q;
    }
    if (vec_b && k0 + kBK <= K) {  // 16-byte copies: K % 16 == 0 and B 16-byte aligned
      for (int e = tid; e < BN * kSlabs; e += THREADS) {
        const int n = e / kSlabs, sl = e % kSlabs;
        int4 v = make_int4(0, 0, 0, 0);
        if (n0 + n < N) v = __ldg(reinterpret_cast<const int4*>(B + (n0 + n) * int64_t(K) + k0 + sl * 16));
        *reinterpret_cast<int4*>(&Bs[sl][n][0]) = v;
      }
    } else {
      for (int e = tid; e < BN * kBK; e += THREADS) {
        const int n = e / kBK, kk = e % kBK;
        const int64_t k = k0 + kk;
        Bs[kk / 16][n][kk % 16] = (n0 + n < N && k < K) ? B[(n0 + n) * int64_t(K) + k] : int8_t(0);
      }
    }
    __syncthreads();
#pragma unroll
    for (int sl = 0; sl < kSlabs; ++sl) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, signed char, wmma::row_major> fa[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, signed char, wmma::col_major> fb[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i)
        wmma::load_matrix_sync(fa[i], reinterpret_cast<const signed char*>(&As[sl][(warp_m * FM + i) * 16][0]), 16);
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::load_matrix_sync(fb[j], reinterpret_cast<const signed char*>(&Bs[sl][(warp_n * FN + j) * 16][0]), 16);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
    }
    __syncthreads();
  }

  // 3. epilogue
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(&Cs[(warp_m * FM + i) * 16][(warp_n * FN + j) * 16], acc[i][j], BN,
                              wmma::mem_row_major);
  __syncthreads();
  for (int e = tid; e < BM * BN; e += THREADS) {
    const int r = e / BN, c = e % BN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m >= M || n >= N) continue;
    float y = float(Cs[r][c]) * s_row[r] * __ldg(b_scale + n);
    for (int j = 0; j < R; ++j) {
      const int64_t k = oidx[j];
      if (k >= 0 && k < K) y += load_f<T>(A + m * K + k) * __ldg(B_out + int64_t(j) * N + n);
    }
    if (bias != nullptr) y += __ldg(bias + n);
    Y[m * N + n] = store_f<T>(y);
  }
}

void set_err(char* err, size_t n, const char* what, cudaError_t e) {
  if (err != nullptr && n > 0) snprintf(err, n, "%s: %s", what, cudaGetErrorString(e));
}

template <typename T, int WM, int WN, int FM, int FN>
cudaError_t launch(const void* A, const int8_t* B, const float* b_scale, const float* bias, const int64_t* oidx,
                   int R, const float* B_out, void* Y, int M, int K, int N, cudaStream_t stream) {
  constexpr int BM = WM * FM * 16, BN = WN * FN * 16;
  dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);
  const size_t smem = R > 0 ? size_t((K + 31) / 32) * sizeof(uint32_t) : 0;
  const bool vec_b = (K % 16 == 0) && (reinterpret_cast<uintptr_t>(B) % 16 == 0);
  auto kernel = w8a8_gemm_kernel<T, WM, WN, FM, FN>;
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem));
    if (e != cudaSuccess) return e;
  }
  kernel<<<grid, WM * WN * 32, smem, stream>>>(static_cast<const T*>(A), B, b_scale, bias, oidx, R, B_out,
                                                static_cast<T*>(Y), M, K, N, vec_b);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch(const void* A, const int8_t* B, const float* b_scale, const float* bias, const int64_t* oidx,
                     int R, const float* B_out, void* Y, int M, int K, int N, cudaStream_t stream) {
  if (M <= 16)  // decode: 16 x 32 tiles, two warps, more blocks along N
    return launch<T, 1, 2, 1, 1>(A, B, b_scale, bias, oidx, R, B_out, Y, M, K, N, stream);
  return launch<T, 2, 2, 2, 2>(A, B, b_scale, bias, oidx, R, B_out, Y, M, K, N, stream);  // 64 x 64 tiles
}

}  // namespace

extern "C" __attribute__((visibility("default"))) int qc_cuda_w8a8_gemm(int dtype, const void* A, const int8_t* B, const float* b_scale, const float* bias,
                                 const int64_t* oidx, int64_t R, const float* B_out, void* Y, int64_t M, int64_t K,
                                 int64_t N, void* stream, char* err, size_t err_len) {
  if (M <= 0 || N <= 0) return 0;
  if (M > INT32_MAX || K > INT32_MAX || N > INT32_MAX || R > INT32_MAX) {
    if (err != nullptr && err_len > 0) snprintf(err, err_len, "problem too large for the kernel (M, K, N < 2^31)");
    return int(cudaErrorInvalidValue);
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  if (dtype == 1)
    e = dispatch<float>(A, B, b_scale, bias, oidx, int(R), B_out, Y, int(M), int(K), int(N), s);
  else if (dtype == 10)
    e = dispatch<__half>(A, B, b_scale, bias, oidx, int(R), B_out, Y, int(M), int(K), int(N), s);
  else if (dtype == 16)
    e = dispatch<__nv_bfloat16>(A, B, b_scale, bias, oidx, int(R), B_out, Y, int(M), int(K), int(N), s);
  else {
    if (err != nullptr && err_len > 0)
      snprintf(err, err_len, "unsupported element type %d (float, float16 or bfloat16)", dtype);
    return int(cudaErrorInvalidValue);
  }
  if (e != cudaSuccess) set_err(err, err_len, "kernel launch", e);
  return int(e);
}

extern "C" __attribute__((visibility("default"))) int qc_cuda_device_count(char* err, size_t err_len) {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e == cudaErrorNoDevice || e == cudaErrorInsufficientDriver) return 0;
  if (e != cudaSuccess) {
    set_err(err, err_len, "cudaGetDeviceCount", e);
    return -int(e);
  }
  return n;
}

#define QC_TRY(call)                                   \
  do {                                                 \
    cudaError_t e_ = (call);                           \
    if (e_ != cudaSuccess) {                           \
      set_err(err, err_len, #call, e_);                \
      rc = int(e_);                                    \
      goto done;                                       \
    }                                                  \
  } while (0)

extern "C" __attribute__((visibility("default"))) int qc_cuda_w8a8_gemm_host(int dtype, const void* A, const int8_t* B, const float* b_scale,
                                      const float* bias, const int64_t* oidx, int64_t R, const float* B_out, void* Y,
                                      int64_t M, int64_t K, int64_t N, int warmup, int iters, double* usec,
                                      char* err, size_t err_len) {
  const size_t esz = (dtype == 10 || dtype == 16) ? 2 : 4;
  void *dA = nullptr, *dY = nullptr;
  int8_t* dB = nullptr;
  float *ds = nullptr, *dbias = nullptr, *dBo = nullptr;
  int64_t* didx = nullptr;
  cudaEvent_t t0 = nullptr, t1 = nullptr;
  cudaStream_t stream = nullptr;
  float ms = 0.f;
  int rc = 0;
  QC_TRY(cudaStreamCreate(&stream));
  QC_TRY(cudaMalloc(&dA, size_t(M * K) * esz + 16));
  QC_TRY(cudaMalloc(&dY, size_t(M * N) * esz + 16));
  QC_TRY(cudaMalloc(reinterpret_cast<void**>(&dB), size_t(N * K) + 16));
  QC_TRY(cudaMalloc(reinterpret_cast<void**>(&ds), size_t(N) * 4 + 16));
  QC_TRY(cudaMemcpy(dA, A, size_t(M * K) * esz, cudaMemcpyHostToDevice));
  QC_TRY(cudaMemcpy(dB, B, size_t(N * K), cudaMemcpyHostToDevice));
  QC_TRY(cudaMemcpy(ds, b_scale, size_t(N) * 4, cudaMemcpyHostToDevice));
  if (bias != nullptr) {
    QC_TRY(cudaMalloc(reinterpret_cast<void**>(&dbias), size_t(N) * 4));
    QC_TRY(cudaMemcpy(dbias, bias, size_t(N) * 4, cudaMemcpyHostToDevice));
  }
  if (R > 0) {
    QC_TRY(cudaMalloc(reinterpret_cast<void**>(&didx), size_t(R) * 8));
    QC_TRY(cudaMalloc(reinterpret_cast<void**>(&dBo), size_t(R * N) * 4));
    QC_TRY(cudaMemcpy(didx, oidx, size_t(R) * 8, cudaMemcpyHostToDevice));
    QC_TRY(cudaMemcpy(dBo, B_out, size_t(R * N) * 4, cudaMemcpyHostToDevice));
  }
  for (int i = 0; i < warmup + 1; ++i) {
    rc = qc_cuda_w8a8_gemm(dtype, dA, dB, ds, dbias, didx, R, dBo, dY, M, K, N, stream, err, err_len);
    if (rc != 0) goto done;
  }
  QC_TRY(cudaStreamSynchronize(stream));
  QC_TRY(cudaMemcpy(Y, dY, size_t(M * N) * esz, cudaMemcpyDeviceToHost));
  if (iters > 0 && usec != nullptr) {
    QC_TRY(cudaEventCreate(&t0));
    QC_TRY(cudaEventCreate(&t1));
    QC_TRY(cudaEventRecord(t0, stream));
    for (int i = 0; i < iters; ++i) {
      rc = qc_cuda_w8a8_gemm(dtype, dA, dB, ds, dbias, didx, R, dBo, dY, M, K, N, stream, err, err_len);
      if (rc != 0) goto done;
    }
    QC_TRY(cudaEventRecord(t1, stream));
    QC_TRY(cudaEventSynchronize(t1));
    QC_TRY(cudaEventElapsedTime(&ms, t0, t1));
    *usec = double(ms) * 1000.0 / iters;
  }
done:
  if (t0) cudaEventDestroy(t0);
  if (t1) cudaEventDestroy(t1);
  cudaFree(dA);
  cudaFree(dY);
  cudaFree(dB);
  cudaFree(ds);
  cudaFree(dbias);
  cudaFree(didx);
  cudaFree(dBo);
  if (stream) cudaStreamDestroy(stream);
  return rc;
}
