// qcompiler's ONNX Runtime custom ops (domain "qcompiler"), registered by
// SessionOptions.register_custom_ops_library through RegisterCustomOps().
//
//   W8A8MatMul(A: T[..., K], B: int8[N, K], b_scale: float[N], bias?: float[N]) -> Y: T[..., N]
//     Y[r, n] = (sum_k q[r, k] * B[n, k]) * s[r] * b_scale[n] + bias[n]
//     with s[r] = max(max_k |A[r, k]|, 1e-8) / 127, q = clip(round_half_even(A / s), -127, 127).
//
//   W8A8OutlierMatMul(A: T[..., K], B: int8[N, K], b_scale: float[N], outlier_idx: int64[R],
//                     B_outlier: float[R, N], bias?: float[N]) -> Y: T[..., N]
//     the same with the outlier channels idx left out of s[r] and of the int8 product
//     (q[r, idx] = 0), plus the float side path  Y[r, n] += sum_j A[r, idx[j]] * B_outlier[j, n].
//
// T is float, float16 or bfloat16.  Every op has a CPU kernel; built with QC_WITH_CUDA the library
// also registers CUDA kernels for CUDAExecutionProvider (qc_cuda.cu).
#include <string.h>

#include <exception>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "ort_abi.h"
#include "qc_cpu_gemm.h"
#ifdef QC_WITH_CUDA
#include "qc_cuda.h"
#endif

#define QC_EXPORT extern "C" __attribute__((visibility("default")))

namespace {

// ---------------------------------------------------------------- OrtApi entries

struct Api {
  const OrtApi* api = nullptr;
  QcFnCreateStatus CreateStatus = nullptr;
  QcFnGetErrorMessage GetErrorMessage = nullptr;
  QcFnReleaseStatus ReleaseStatus = nullptr;
  QcFnGetTensorMutableData GetTensorMutableData = nullptr;
  QcFnGetTensorElementType GetTensorElementType = nullptr;
  QcFnGetDimensionsCount GetDimensionsCount = nullptr;
  QcFnGetDimensions GetDimensions = nullptr;
  QcFnGetTensorTypeAndShape GetTensorTypeAndShape = nullptr;
  QcFnReleaseTensorTypeAndShapeInfo ReleaseTensorTypeAndShapeInfo = nullptr;
  QcFnKernelContext_GetInputCount GetInputCount = nullptr;
  QcFnKernelContext_GetInput GetInput = nullptr;
  QcFnKernelContext_GetOutput GetOutput = nullptr;
  QcFnKernelContext_ParallelFor ParallelFor = nullptr;
  QcFnKernelContext_GetGPUComputeStream GetGPUComputeStream = nullptr;

  void bind(const OrtApi* a) {
    api = a;
    CreateStatus = qc_ort_fn<QcFnCreateStatus>(a, QC_ORT_CreateStatus);
    GetErrorMessage = qc_ort_fn<QcFnGetErrorMessage>(a, QC_ORT_GetErrorMessage);
    ReleaseStatus = qc_ort_fn<QcFnReleaseStatus>(a, QC_ORT_ReleaseStatus);
    GetTensorMutableData = qc_ort_fn<QcFnGetTensorMutableData>(a, QC_ORT_GetTensorMutableData);
    GetTensorElementType = qc_ort_fn<QcFnGetTensorElementType>(a, QC_ORT_GetTensorElementType);
    GetDimensionsCount = qc_ort_fn<QcFnGetDimensionsCount>(a, QC_ORT_GetDimensionsCount);
    GetDimensions = qc_ort_fn<QcFnGetDimensions>(a, QC_ORT_GetDimensions);
    GetTensorTypeAndShape = qc_ort_fn<QcFnGetTensorTypeAndShape>(a, QC_ORT_GetTensorTypeAndShape);
    ReleaseTensorTypeAndShapeInfo =
        qc_ort_fn<QcFnReleaseTensorTypeAndShapeInfo>(a, QC_ORT_ReleaseTensorTypeAndShapeInfo);
    GetInputCount = qc_ort_fn<QcFnKernelContext_GetInputCount>(a, QC_ORT_KernelContext_GetInputCount);
    GetInput = qc_ort_fn<QcFnKernelContext_GetInput>(a, QC_ORT_KernelContext_GetInput);
    GetOutput = qc_ort_fn<QcFnKernelContext_GetOutput>(a, QC_ORT_KernelContext_GetOutput);
    ParallelFor = qc_ort_fn<QcFnKernelContext_ParallelFor>(a, QC_ORT_KernelContext_ParallelFor);
    GetGPUComputeStream =
        qc_ort_fn<QcFnKernelContext_GetGPUComputeStream>(a, QC_ORT_KernelContext_GetGPUComputeStream);
  }
};

Api g_api;
qc::Isa g_isa = qc::Isa::kScalar;

struct OpError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Turn an OrtStatus from ORT into an exception (and release it).
void check(OrtStatus* st, const char* what) {
  if (st == nullptr) return;
  std::string msg = std::string(what) + ": " + g_api.GetErrorMessage(st);
  g_api.ReleaseStatus(st);
  throw OpError(msg);
}

// ---------------------------------------------------------------- op definitions

enum class Kind { kW8A8, kOutlier };

struct OpDef {
  OrtCustomOp ort;  // first member: ORT hands us back &ort
  Kind kind;
  ONNXTensorElementDataType t;  // element type of A and Y
  bool cuda;
};

const OpDef* def_of(const OrtCustomOp* op) { return reinterpret_cast<const OpDef*>(op); }

const char* op_name(Kind k) { return k == Kind::kW8A8 ? "W8A8MatMul" : "W8A8OutlierMatMul"; }

size_t n_inputs(Kind k) { return k == Kind::kW8A8 ? 4 : 6; }

ONNXTensorElementDataType input_type(const OpDef* d, size_t i) {
  if (i == 0) return d->t;
  if (i == 1) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8;
  if (d->kind == Kind::kOutlier && i == 3) return ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;  // b_scale, B_outlier, bias
}

struct Kernel {
  const OpDef* def;
};

// ---------------------------------------------------------------- tensors

struct In {
  const void* data = nullptr;
  std::vector<int64_t> shape;
  ONNXTensorElementDataType type = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  bool present() const { return data != nullptr || !shape.empty(); }
  int64_t numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    return n;
  }
};

std::vector<int64_t> shape_of(const OrtValue* v, ONNXTensorElementDataType* type) {
  OrtTensorTypeAndShapeInfo* info = nullptr;
  check(g_api.GetTensorTypeAndShape(v, &info), "GetTensorTypeAndShape");
  size_t n = 0;
  std::vector<int64_t> dims;
  OrtStatus* st = g_api.GetDimensionsCount(info, &n);
  if (st == nullptr) {
    dims.resize(n);
    st = g_api.GetDimensions(info, dims.data(), n);
  }
  if (st == nullptr && type != nullptr) st = g_api.GetTensorElementType(info, type);
  g_api.ReleaseTensorTypeAndShapeInfo(info);
  check(st, "tensor shape");
  return dims;
}

In get_input(OrtKernelContext* ctx, size_t count, size_t i) {
  In in;
  if (i >= count) return in;
  const OrtValue* v = nullptr;
  check(g_api.GetInput(ctx, i, &v), "KernelContext_GetInput");
  if (v == nullptr) return in;
  in.shape = shape_of(v, &in.type);
  void* p = nullptr;
  check(g_api.GetTensorMutableData(const_cast<OrtValue*>(v), &p), "GetTensorMutableData");
  in.data = p;
  if (in.data == nullptr && in.numel() != 0) throw OpError("input " + std::to_string(i) + " has no data");
  return in;
}

std::string dims_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

// Everything a kernel needs, validated.
struct Problem {
  const void* A;
  const int8_t* B;
  const float* b_scale;
  const float* bias = nullptr;
  const int64_t* oidx = nullptr;
  const float* B_out = nullptr;
  int64_t M = 0, K = 0, N = 0, R = 0;
  std::vector<int64_t> y_shape;
};

Problem read_problem(const OpDef* d, OrtKernelContext* ctx) {
  size_t count = 0;
  check(g_api.GetInputCount(ctx, &count), "KernelContext_GetInputCount");
  const std::string name = op_name(d->kind);
  In a = get_input(ctx, count, 0), b = get_input(ctx, count, 1), sc = get_input(ctx, count, 2);
  if (a.shape.empty()) throw OpError(name + ": A must have rank >= 1");
  if (b.shape.size() != 2) throw OpError(name + ": B must be int8 [N, K], got shape " + dims_str(b.shape));
  Problem p;
  p.K = a.shape.back();
  p.N = b.shape[0];
  if (b.shape[1] != p.K)
    throw OpError(name + ": A's last dimension is " + std::to_string(p.K) + " but B is " + dims_str(b.shape) +
                  " (B must be int8 [N, K])");
  if (sc.numel() != p.N || sc.shape.size() != 1)
    throw OpError(name + ": b_scale must be float [N=" + std::to_string(p.N) + "], got " + dims_str(sc.shape));
  p.M = 1;
  for (size_t i = 0; i + 1 < a.shape.size(); ++i) p.M *= a.shape[i];
  p.A = a.data;
  p.B = static_cast<const int8_t*>(b.data);
  p.b_scale = static_cast<const float*>(sc.data);
  size_t bias_index = 3;
  if (d->kind == Kind::kOutlier) {
    In idx = get_input(ctx, count, 3), bo = get_input(ctx, count, 4);
    if (idx.shape.size() != 1) throw OpError(name + ": outlier_idx must be int64 [R], got " + dims_str(idx.shape));
    p.R = idx.shape[0];
    if (bo.shape.size() != 2 || bo.shape[0] != p.R || bo.shape[1] != p.N)
      throw OpError(name + ": B_outlier must be float [R=" + std::to_string(p.R) + ", N=" + std::to_string(p.N) +
                    "], got " + dims_str(bo.shape));
    p.oidx = static_cast<const int64_t*>(idx.data);
    p.B_out = static_cast<const float*>(bo.data);
    bias_index = 5;
  }
  In bias = get_input(ctx, count, bias_index);
  if (bias.present()) {
    if (bias.numel() != p.N || bias.shape.size() != 1)
      throw OpError(name + ": bias must be float [N=" + std::to_string(p.N) + "], got " + dims_str(bias.shape));
    p.bias = static_cast<const float*>(bias.data);
  }
  p.y_shape.assign(a.shape.begin(), a.shape.end() - 1);
  p.y_shape.push_back(p.N);
  return p;
}

void* get_output(OrtKernelContext* ctx, const std::vector<int64_t>& shape) {
  OrtValue* out = nullptr;
  check(g_api.GetOutput(ctx, 0, shape.data(), shape.size(), &out), "KernelContext_GetOutput");
  void* p = nullptr;
  check(g_api.GetTensorMutableData(out, &p), "GetTensorMutableData(Y)");
  return p;
}

// ---------------------------------------------------------------- CPU kernel

// Run fn(i) for i in [0, total) on ORT's intra-op thread pool (serially if unavailable).
template <typename F>
void parallel_for(OrtKernelContext* ctx, size_t total, F&& fn) {
  if (total == 0) return;
  struct Thunk {
    F* f;
    static void call(void* self, size_t i) { (*static_cast<Thunk*>(self)->f)(i); }
  } thunk{&fn};
  if (total > 1 && g_api.ParallelFor != nullptr) {
    OrtStatus* st = g_api.ParallelFor(ctx, &Thunk::call, total, 0, &thunk);
    if (st == nullptr) return;
    g_api.ReleaseStatus(st);
  }
  for (size_t i = 0; i < total; ++i) fn(i);
}

template <typename T>
void compute_cpu(const Problem& p, OrtKernelContext* ctx, T* Y) {
  const T* A = static_cast<const T*>(p.A);
  const int64_t M = p.M, K = p.K, N = p.N, R = p.R;
  std::vector<uint8_t> mask;
  if (R > 0) {
    mask.assign(size_t(K), 0);
    for (int64_t j = 0; j < R; ++j) {
      if (p.oidx[j] < 0 || p.oidx[j] >= K)
        throw OpError("W8A8OutlierMatMul: outlier index " + std::to_string(p.oidx[j]) + " is outside [0, " +
                      std::to_string(K) + ")");
      mask[size_t(p.oidx[j])] = 1;
    }
  }
  std::vector<int8_t> q(static_cast<size_t>(M * K));
  std::vector<float> s(static_cast<size_t>(M));
  std::vector<float> a_out(static_cast<size_t>(M * R));
  constexpr int64_t kRowsPerTask = 8;
  const int64_t row_tasks = (M + kRowsPerTask - 1) / kRowsPerTask;
  parallel_for(ctx, size_t(row_tasks), [&](size_t t) {
    const int64_t r0 = int64_t(t) * kRowsPerTask, r1 = std::min(M, r0 + kRowsPerTask);
    qc::quantize_rows<T>(A, r0, r1, K, R ? mask.data() : nullptr, p.oidx, R, q.data(), s.data(), a_out.data());
  });

  constexpr int64_t kMB = 16, kNB = 64;
  const int64_t mt = (M + kMB - 1) / kMB, nt = (N + kNB - 1) / kNB;
  parallel_for(ctx, size_t(mt * nt), [&](size_t t) {
    const int64_t m0 = (int64_t(t) / nt) * kMB, n0 = (int64_t(t) % nt) * kNB;
    const int64_t m1 = std::min(M, m0 + kMB), n1 = std::min(N, n0 + kNB);
    int32_t acc[kMB * kNB];
    // C rows m0..m1 into a local tile: C[(m - m0) * kNB + (n - n0)]
    qc::gemm_i8(g_isa, q.data() + m0 * K, p.B + n0 * K, K, 0, m1 - m0, 0, n1 - n0, acc, kNB);
    for (int64_t m = m0; m < m1; ++m) {
      const float sm = s[size_t(m)];
      for (int64_t n = n0; n < n1; ++n) {
        float y = float(acc[(m - m0) * kNB + (n - n0)]) * sm * p.b_scale[n];
        for (int64_t j = 0; j < R; ++j) y += a_out[size_t(m * R + j)] * p.B_out[j * N + n];
        if (p.bias) y += p.bias[n];
        Y[m * N + n] = qc::from_float<T>(y);
      }
    }
  });
}

// ---------------------------------------------------------------- ORT callbacks

OrtStatus* make_status(OrtErrorCode code, const std::string& msg) { return g_api.CreateStatus(code, msg.c_str()); }

OrtStatus* compute(void* kernel, OrtKernelContext* ctx) noexcept {
  const OpDef* d = static_cast<Kernel*>(kernel)->def;
  try {
    Problem p = read_problem(d, ctx);
    void* Y = get_output(ctx, p.y_shape);
    if (p.M == 0 || p.N == 0) return nullptr;
    if (d->cuda) {
#ifdef QC_WITH_CUDA
      void* stream = nullptr;
      check(g_api.GetGPUComputeStream(ctx, &stream), "KernelContext_GetGPUComputeStream");
      char err[512] = {0};
      int rc = qc_cuda_w8a8_gemm(int(d->t), p.A, p.B, p.b_scale, p.bias, p.oidx, p.R, p.B_out, Y, p.M, p.K, p.N,
                                 stream, err, sizeof(err));
      if (rc != 0) return make_status(ORT_EP_FAIL, std::string(op_name(d->kind)) + " (CUDA): " + err);
      return nullptr;
#else
      return make_status(ORT_NOT_IMPLEMENTED, "qcompiler ops were built without CUDA");
#endif
    }
    if (d->t == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
      compute_cpu<float>(p, ctx, static_cast<float*>(Y));
    else if (d->t == ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16)
      compute_cpu<qc::bf16_t>(p, ctx, static_cast<qc::bf16_t*>(Y));
    else
      compute_cpu<uint16_t>(p, ctx, static_cast<uint16_t*>(Y));
    return nullptr;
  } catch (const std::exception& e) {
    return make_status(ORT_INVALID_ARGUMENT, e.what());
  } catch (...) {
    return make_status(ORT_RUNTIME_EXCEPTION, std::string(op_name(d->kind)) + ": unknown error");
  }
}

OrtStatus* create_kernel(const OrtCustomOp* op, const OrtApi*, const OrtKernelInfo*, void** kernel) noexcept {
  try {
    *kernel = new Kernel{def_of(op)};
    return nullptr;
  } catch (...) {
    return make_status(ORT_FAIL, "out of memory creating a qcompiler kernel");
  }
}

void destroy_kernel(void* kernel) noexcept { delete static_cast<Kernel*>(kernel); }

const char* get_name(const OrtCustomOp* op) noexcept { return op_name(def_of(op)->kind); }

const char* get_ep(const OrtCustomOp* op) noexcept {
  return def_of(op)->cuda ? "CUDAExecutionProvider" : "CPUExecutionProvider";
}

ONNXTensorElementDataType get_input_type(const OrtCustomOp* op, size_t i) noexcept {
  return input_type(def_of(op), i);
}

size_t get_input_count(const OrtCustomOp* op) noexcept { return n_inputs(def_of(op)->kind); }

ONNXTensorElementDataType get_output_type(const OrtCustomOp* op, size_t) noexcept { return def_of(op)->t; }

size_t get_output_count(const OrtCustomOp*) noexcept { return 1; }

OrtCustomOpInputOutputCharacteristic get_input_char(const OrtCustomOp* op, size_t i) noexcept {
  return i + 1 == n_inputs(def_of(op)->kind) ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;  // bias
}

OrtCustomOpInputOutputCharacteristic get_output_char(const OrtCustomOp*, size_t) noexcept {
  return INPUT_OUTPUT_REQUIRED;
}

OrtMemType get_input_mem(const OrtCustomOp*, size_t) noexcept { return OrtMemTypeDefault; }

int variadic_min_arity(const OrtCustomOp*) noexcept { return 1; }
int variadic_homogeneous(const OrtCustomOp*) noexcept { return 1; }

OpDef make_def(Kind kind, ONNXTensorElementDataType t, bool cuda) {
  OpDef d;
  memset(&d.ort, 0, sizeof(d.ort));
  d.ort.version = QC_ORT_CUSTOM_OP_VERSION;
  d.ort.GetName = get_name;
  d.ort.GetExecutionProviderType = get_ep;
  d.ort.GetInputType = get_input_type;
  d.ort.GetInputTypeCount = get_input_count;
  d.ort.GetOutputType = get_output_type;
  d.ort.GetOutputTypeCount = get_output_count;
  d.ort.KernelDestroy = destroy_kernel;
  d.ort.GetInputCharacteristic = get_input_char;
  d.ort.GetOutputCharacteristic = get_output_char;
  d.ort.GetInputMemoryType = get_input_mem;
  d.ort.GetVariadicInputMinArity = variadic_min_arity;
  d.ort.GetVariadicInputHomogeneity = variadic_homogeneous;
  d.ort.GetVariadicOutputMinArity = variadic_min_arity;
  d.ort.GetVariadicOutputHomogeneity = variadic_homogeneous;
  d.ort.CreateKernelV2 = create_kernel;
  d.ort.KernelComputeV2 = compute;
  d.kind = kind;
  d.t = t;
  d.cuda = cuda;
  return d;
}

// All op definitions; they must outlive every session, so they are static.
std::vector<OpDef>& all_defs() {
  static std::vector<OpDef> defs = [] {
    std::vector<OpDef> v;
    const bool with_cuda[] = {false
#ifdef QC_WITH_CUDA
                              ,
                              true
#endif
    };
    for (bool cuda : with_cuda)
      for (Kind k : {Kind::kW8A8, Kind::kOutlier})
        for (auto t : {ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16,
                       ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16})
          v.push_back(make_def(k, t, cuda));
    return v;
  }();
  return defs;
}

}  // namespace

// ---------------------------------------------------------------- exported entry points

QC_EXPORT OrtStatus* RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* api_base) {
  const OrtApi* api = api_base->GetApi(QC_ORT_API_VERSION);
  if (api == nullptr) {
    const OrtApi* old = api_base->GetApi(1);
    std::string msg = std::string("qcompiler ops need ONNX Runtime >= 1.17 (C API version ") +
                      std::to_string(QC_ORT_API_VERSION) + "); this is " + api_base->GetVersionString();
    return old ? qc_ort_fn<QcFnCreateStatus>(old, QC_ORT_CreateStatus)(ORT_FAIL, msg.c_str()) : nullptr;
  }
  g_api.bind(api);
  g_isa = qc::detect_isa();
  OrtCustomOpDomain* domain = nullptr;
  OrtStatus* st = qc_ort_fn<QcFnCreateCustomOpDomain>(api, QC_ORT_CreateCustomOpDomain)("qcompiler", &domain);
  if (st) return st;
  for (OpDef& d : all_defs()) {
    st = qc_ort_fn<QcFnCustomOpDomain_Add>(api, QC_ORT_CustomOpDomain_Add)(domain, &d.ort);
    if (st) return st;
  }
  // The domain must outlive the sessions created from `options`; it is never released.
  return qc_ort_fn<QcFnAddCustomOpDomain>(api, QC_ORT_AddCustomOpDomain)(options, domain);
}

// Build facts, for `qc ops build` and tests (ctypes).
QC_EXPORT const char* qc_ops_build_info() {
  static std::string info = std::string("{\"cuda\": ") +
#ifdef QC_WITH_CUDA
                            "true"
#else
                            "false"
#endif
                            + ", \"isa\": \"" + qc::isa_name(qc::detect_isa()) + "\", \"ops\": [\"W8A8MatMul\", "
                            "\"W8A8OutlierMatMul\"], \"ort_api_version\": " + std::to_string(QC_ORT_API_VERSION) + "}";
  return info.c_str();
}
