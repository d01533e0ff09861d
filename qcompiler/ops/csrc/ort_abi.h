// The minimal slice of ONNX Runtime's C ABI that qcompiler's op library needs.
//
// ONNX Runtime's headers are not shipped with its Python wheel, so this file declares
// exactly what the library uses, written from the public documentation of the C API:
//
//  * OrtApiBase: the two-entry table returned by OrtGetApiBase(), passed to
//    RegisterCustomOps().
//  * OrtApi: a table of function pointers that only ever grows at the end (entries are
//    never reordered).  We do not declare the 400-entry struct; we read the entries we
//    use by their index (QC_ORT_*), each checked by tests that load the library into the
//    installed onnxruntime and run every op.
//  * OrtCustomOp: the struct a custom op fills in.  Its `version` tells ONNX Runtime
//    which trailing members exist; we declare the layout through ReleaseAliasMap and set
//    version = QC_ORT_CUSTOM_OP_VERSION (17: V2 create/compute, optional inputs, no
//    shape-inference callback, start/end opset versions read only if non-null).
#pragma once

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// API version requested from OrtApiBase::GetApi (1.17 added KernelContext_ParallelFor).
#define QC_ORT_API_VERSION 17
#define QC_ORT_CUSTOM_OP_VERSION 17

typedef enum ONNXTensorElementDataType {
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED = 0,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT = 1,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 = 2,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT8 = 3,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 = 6,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64 = 7,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16 = 10,
  ONNX_TENSOR_ELEMENT_DATA_TYPE_BFLOAT16 = 16,
} ONNXTensorElementDataType;

typedef enum OrtErrorCode {
  ORT_OK = 0,
  ORT_FAIL = 1,
  ORT_INVALID_ARGUMENT = 2,
  ORT_RUNTIME_EXCEPTION = 6,
  ORT_NOT_IMPLEMENTED = 9,
  ORT_EP_FAIL = 11,
} OrtErrorCode;

typedef enum OrtMemType {
  OrtMemTypeCPUInput = -2,
  OrtMemTypeCPUOutput = -1,
  OrtMemTypeDefault = 0,
} OrtMemType;

typedef enum OrtCustomOpInputOutputCharacteristic {
  INPUT_OUTPUT_REQUIRED = 0,
  INPUT_OUTPUT_OPTIONAL = 1,
  INPUT_OUTPUT_VARIADIC = 2,
} OrtCustomOpInputOutputCharacteristic;

// Opaque handles (only ever used through pointers).
typedef struct OrtStatus OrtStatus;
typedef struct OrtApi OrtApi;
typedef struct OrtValue OrtValue;
typedef struct OrtKernelInfo OrtKernelInfo;
typedef struct OrtKernelContext OrtKernelContext;
typedef struct OrtSessionOptions OrtSessionOptions;
typedef struct OrtCustomOpDomain OrtCustomOpDomain;
typedef struct OrtTensorTypeAndShapeInfo OrtTensorTypeAndShapeInfo;
typedef struct OrtShapeInferContext OrtShapeInferContext;

typedef struct OrtApiBase {
  const OrtApi* (*GetApi)(uint32_t version);
  const char* (*GetVersionString)(void);
} OrtApiBase;

typedef struct OrtCustomOp {
  uint32_t version;
  void* (*CreateKernel)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info);
  const char* (*GetName)(const struct OrtCustomOp* op);
  const char* (*GetExecutionProviderType)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType (*GetInputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetInputTypeCount)(const struct OrtCustomOp* op);
  ONNXTensorElementDataType (*GetOutputType)(const struct OrtCustomOp* op, size_t index);
  size_t (*GetOutputTypeCount)(const struct OrtCustomOp* op);
  void (*KernelCompute)(void* op_kernel, OrtKernelContext* context);
  void (*KernelDestroy)(void* op_kernel);
  OrtCustomOpInputOutputCharacteristic (*GetInputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  OrtCustomOpInputOutputCharacteristic (*GetOutputCharacteristic)(const struct OrtCustomOp* op, size_t index);
  OrtMemType (*GetInputMemoryType)(const struct OrtCustomOp* op, size_t index);
  int (*GetVariadicInputMinArity)(const struct OrtCustomOp* op);
  int (*GetVariadicInputHomogeneity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputMinArity)(const struct OrtCustomOp* op);
  int (*GetVariadicOutputHomogeneity)(const struct OrtCustomOp* op);
  OrtStatus* (*CreateKernelV2)(const struct OrtCustomOp* op, const OrtApi* api, const OrtKernelInfo* info,
                               void** kernel);
  OrtStatus* (*KernelComputeV2)(void* op_kernel, OrtKernelContext* context);
  OrtStatus* (*InferOutputShapeFn)(const struct OrtCustomOp* op, OrtShapeInferContext* ctx);
  int (*GetStartVersion)(const struct OrtCustomOp* op);
  int (*GetEndVersion)(const struct OrtCustomOp* op);
  size_t (*GetMayInplace)(int** input_index, int** output_index);
  void (*ReleaseMayInplace)(int* input_index, int* output_index);
  size_t (*GetAliasMap)(int** input_index, int** output_index);
  void (*ReleaseAliasMap)(int* input_index, int* output_index);
} OrtCustomOp;

// Positions of the OrtApi entries we call (the table is append-only).
enum {
  QC_ORT_CreateStatus = 0,
  QC_ORT_GetErrorMessage = 2,
  QC_ORT_CreateCustomOpDomain = 26,
  QC_ORT_CustomOpDomain_Add = 27,
  QC_ORT_AddCustomOpDomain = 28,
  QC_ORT_GetTensorMutableData = 51,
  QC_ORT_GetTensorElementType = 60,
  QC_ORT_GetDimensionsCount = 61,
  QC_ORT_GetDimensions = 62,
  QC_ORT_GetTensorTypeAndShape = 65,
  QC_ORT_KernelContext_GetInputCount = 88,
  QC_ORT_KernelContext_GetInput = 90,
  QC_ORT_KernelContext_GetOutput = 91,
  QC_ORT_ReleaseStatus = 93,
  QC_ORT_ReleaseTensorTypeAndShapeInfo = 99,
  QC_ORT_KernelContext_GetGPUComputeStream = 193,
  QC_ORT_KernelContext_ParallelFor = 274,
};

// Signatures of those entries.
typedef OrtStatus* (*QcFnCreateStatus)(OrtErrorCode code, const char* msg);
typedef const char* (*QcFnGetErrorMessage)(const OrtStatus* status);
typedef OrtStatus* (*QcFnCreateCustomOpDomain)(const char* domain, OrtCustomOpDomain** out);
typedef OrtStatus* (*QcFnCustomOpDomain_Add)(OrtCustomOpDomain* domain, const OrtCustomOp* op);
typedef OrtStatus* (*QcFnAddCustomOpDomain)(OrtSessionOptions* options, OrtCustomOpDomain* domain);
typedef OrtStatus* (*QcFnGetTensorMutableData)(OrtValue* value, void** out);
typedef OrtStatus* (*QcFnGetTensorElementType)(const OrtTensorTypeAndShapeInfo* info,
                                               ONNXTensorElementDataType* out);
typedef OrtStatus* (*QcFnGetDimensionsCount)(const OrtTensorTypeAndShapeInfo* info, size_t* out);
typedef OrtStatus* (*QcFnGetDimensions)(const OrtTensorTypeAndShapeInfo* info, int64_t* dims, size_t n);
typedef OrtStatus* (*QcFnGetTensorTypeAndShape)(const OrtValue* value, OrtTensorTypeAndShapeInfo** out);
typedef OrtStatus* (*QcFnKernelContext_GetInputCount)(const OrtKernelContext* ctx, size_t* out);
typedef OrtStatus* (*QcFnKernelContext_GetInput)(const OrtKernelContext* ctx, size_t index, const OrtValue** out);
typedef OrtStatus* (*QcFnKernelContext_GetOutput)(OrtKernelContext* ctx, size_t index, const int64_t* dims,
                                                  size_t n, OrtValue** out);
typedef void (*QcFnReleaseStatus)(OrtStatus* status);
typedef void (*QcFnReleaseTensorTypeAndShapeInfo)(OrtTensorTypeAndShapeInfo* info);
typedef OrtStatus* (*QcFnKernelContext_GetGPUComputeStream)(const OrtKernelContext* ctx, void** out);
typedef OrtStatus* (*QcFnKernelContext_ParallelFor)(const OrtKernelContext* ctx, void (*fn)(void*, size_t),
                                                    size_t total, size_t num_batch, void* usr_data);

#ifdef __cplusplus
}  // extern "C"

// Typed access to one entry of the OrtApi table.
template <typename Fn>
inline Fn qc_ort_fn(const OrtApi* api, int index) {
  return reinterpret_cast<Fn>(reinterpret_cast<void* const*>(api)[index]);
}
#endif
