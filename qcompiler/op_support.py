"""Op-support tables: the op types each target's execution provider has kernels for.

Used by the partition check when the provider is not installed.  ``CUDA_OPS`` lists the
kernels ONNX Runtime's CUDA provider registers (its ``docs/OperatorKernels.md``, ORT
1.2x–1.3x), by domain; a few entries carry the dtype rules that matter for quantized
graphs (``MatMulInteger`` is int8×int8 only, int4 ``DequantizeLinear`` needs opset 21).
The npu table is the plain-QDQ contract of the npu target: default-domain ops at opset
≤ 21, weights dequantized from symmetric int8 per channel or symmetric int4.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx

_T = onnx.TensorProto

CUDA_ONNX_OPS = frozenset(["Abs", "Add", "Affine", "And", "ArgMax", "ArgMin", "Attention", "AveragePool", "BatchNormalization", "Cast", "Ceil", "Clip", "Compress", "Concat", "ConcatFromSequence", "Constant", "ConstantOfShape", "Conv", "ConvTranspose", "Cos", "Crop", "CumSum", "DepthToSpace", "DequantizeLinear", "Div", "Dropout", "DynamicSlice", "Einsum", "Elu", "Equal", "Erf", "Exp", "Expand", "EyeLike", "Flatten", "Floor", "GRU", "Gather", "GatherElements", "GatherND", "Gelu", "Gemm", "GlobalAveragePool", "GlobalMaxPool", "Greater", "GreaterOrEqual", "GridSample", "HardSigmoid", "HardSwish", "Identity", "If", "ImageScaler", "InstanceNormalization", "IsInf", "IsNaN", "LRN", "LSTM", "LayerNormalization", "LeakyRelu", "Less", "LessOrEqual", "Log", "LogSoftmax", "Loop", "MatMul", "MatMulInteger", "Max", "MaxPool", "MemcpyFromHost", "MemcpyToHost", "Min", "Mod", "Mul", "Neg", "NonZero", "Not", "OneHot", "Or", "PRelu", "Pad", "ParametricSoftplus", "Pow", "QuantizeLinear", "RMSNormalization", "RNN", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Range", "Reciprocal", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean", "ReduceMin", "ReduceProd", "ReduceSum", "ReduceSumSquare", "Relu", "Reshape", "Resize", "ReverseSequence", "RoiAlign", "RotaryEmbedding", "Round", "ScaledTanh", "Scan", "Scatter", "ScatterElements", "ScatterND", "Selu", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert", "SequenceLength", "Shape", "Shrink", "Sigmoid", "Sign", "SimplifiedLayerNormalization", "Sin", "Size", "Slice", "Softmax", "Softplus", "Softsign", "SpaceToDepth", "Split", "Sqrt", "Squeeze", "Sub", "Sum", "Tanh", "TensorScatter", "ThresholdedRelu", "Tile", "TopK", "Transpose", "Trilu", "Unsqueeze", "Upsample", "Where", "Xor"])

CUDA_MS_OPS = frozenset(["Attention", "BeamSearch", "BiasAdd", "BiasDropout", "BiasGelu", "BiasSoftmax", "BiasSplitGelu", "BitmaskBiasDropout", "BitmaskDropout", "ComplexMul", "ComplexMulConj", "ConvTransposeWithDynamicPads", "DecoderAttention", "DecoderMaskedMultiHeadAttention", "DecoderMaskedSelfAttention", "DequantizeLinear", "DequantizeWithOrder", "DynamicTimeWarping", "EmbedLayerNormalization", "FastGelu", "FusedConv", "FusedMatMul", "GatedRelativePositionBias", "GatherBlockQuantized", "Gelu", "GemmFloat8", "GemmaRotaryEmbedding", "GreedySearch", "GridSample", "GroupNorm", "GroupQueryAttention", "Inverse", "Irfft", "LongformerAttention", "MatMulBnb4", "MatMulNBits", "MoE", "MultiHeadAttention", "NGramRepeatBlock", "NhwcConv", "PackedAttention", "PackedMultiHeadAttention", "PagedAttention", "QAttention", "QMoE", "QOrderedAttention", "QOrderedGelu", "QOrderedLayerNormalization", "QOrderedLongformerAttention", "QOrderedMatMul", "QuantizeLinear", "QuantizeWithOrder", "RelativePositionBias", "RemovePadding", "RestorePadding", "Rfft", "RotaryEmbedding", "Sampling", "SkipGroupNorm", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SparseAttention", "TransposeMatMul", "Trilu", "UnfoldTensor", "WhisperBeamSearch"])

CPU_MS_OPS = frozenset(["Attention", "BiasGelu", "DequantizeLinear", "DynamicQuantizeLSTM", "DynamicQuantizeMatMul", "EmbedLayerNormalization", "FastGelu", "FusedConv", "FusedGemm", "FusedMatMul", "GatherBlockQuantized", "Gelu", "GroupQueryAttention", "MatMulBnb4", "MatMulInteger16", "MatMulIntegerToFloat", "MatMulNBits", "MultiHeadAttention", "QAttention", "QGemm", "QLinearAdd", "QLinearConcat", "QLinearMul", "QLinearSigmoid", "QLinearSoftmax", "QuantizeLinear", "QuickGelu", "RotaryEmbedding", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization", "SparseAttention", "Trilu"])

QC_OPS = frozenset({"W8A8MatMul", "W8A8OutlierMatMul"})

PROVIDERS: dict[str, dict] = {
    "cpu": {"providers": ["CPUExecutionProvider"], "table": "qcompiler's CPU table (all ONNX ops, listed contrib ops)"},
    "cuda": {"providers": ["CUDAExecutionProvider"], "table": "qcompiler's CUDA table (ORT OperatorKernels.md)"},
    "npu": {"providers": ["QNNExecutionProvider", "VitisAIExecutionProvider", "OpenVINOExecutionProvider"],
            "table": "the npu plain-QDQ rules (default domain, opset <= 21, symmetric int8/int4 weights)"},
}

_INT4 = (_T.INT4, _T.UINT4)


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _npu_weight_verdict(node: onnx.NodeProto, dtypes: dict[str, int], initializers: set[str],
                        tensor: Callable[[str], np.ndarray | None]) -> str | None:
    """Why a constant-weight DequantizeLinear breaks the npu rules (None if it does not)."""
    x_type = dtypes.get(node.input[0])
    if x_type is None or node.input[0] not in initializers:
        return None  # an activation DQ: not a weight
    if x_type not in (_T.INT8, _T.INT4):
        return f"weight stored as {_T.DataType.Name(x_type).lower()}: NPU weights are symmetric int8/int4"
    if len(node.input) > 2 and node.input[2]:
        zp = tensor(node.input[2])
        if zp is None or np.any(zp != 0):
            return "weight has a non-zero zero point (NPU weights are symmetric)"
    if x_type == _T.INT8 and _attr(node, "block_size", 0):
        return "int8 weight quantized block-wise (NPU int8 weights are per channel)"
    return None


def table_verdict(
    target: str,
    node: onnx.NodeProto,
    opset: int,
    dtypes: dict[str, int],
    initializers: set[str],
    cuda_library: bool,
    tensor: Callable[[str], np.ndarray | None],
) -> tuple[str, str] | None:
    """``(placed_on, reason)`` when ``node`` would not run on the target's provider, else None."""
    domain = node.domain if node.domain != "ai.onnx" else ""
    op = node.op_type
    if target == "npu":
        if domain:
            return "unsupported", f"op of domain '{domain}': the npu target takes standard ONNX ops only"
        if op == "DequantizeLinear":
            why = _npu_weight_verdict(node, dtypes, initializers, tensor)
            if why:
                return "unsupported", why
        return None
    if domain == "qcompiler":
        if op not in QC_OPS:
            return "unsupported", "not an op of qcompiler's library"
        if target == "cuda" and not cuda_library:
            return "CPU (fallback)", "CUDA kernels of qcompiler's ops are not built: run 'qc ops build --cuda'"
        return None
    if target == "cpu":
        if domain == "com.microsoft" and op not in CPU_MS_OPS:
            return "unsupported", "not in the CPU contrib-op table"
        if domain not in ("", "com.microsoft"):
            return "unsupported", f"domain '{domain}' has no CPU kernels in onnxruntime"
        return None
    # cuda
    table = CUDA_ONNX_OPS if domain == "" else CUDA_MS_OPS if domain == "com.microsoft" else frozenset()
    if op not in table:
        return "CPU (fallback)", "no CUDA kernel for this op type"
    if op == "MatMulInteger":
        types = [dtypes.get(n) for n in node.input[:2]]
        if any(t is not None and t != _T.INT8 for t in types):
            return "CPU (fallback)", "CUDA MatMulInteger is int8 x int8 only"
    if op == "DequantizeLinear" and domain == "" and dtypes.get(node.input[0]) in _INT4 and opset < 21:
        return "CPU (fallback)", "int4 DequantizeLinear needs opset 21 on CUDA"
    return None
