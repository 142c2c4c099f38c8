// Plain-C++ interface between the torch binding (fused_kernels.cpp) and the CUDA kernels (*.cu).
//
// The .cu files include no torch header: they compile in seconds with nvcc alone, and an ABI change of torch can
// never reach them. Tensors cross this boundary as raw pointers plus sizes and element strides.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace megatron_fused {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Rotary embedding on q and k in one launch. Tensors are logical [B, S, H, D] views (any strides; the last dim
// contiguous); cos/sin are [B, S, R] views (batch stride 0 when shared by the batch), R = rotated dims (even, <= D).
// Forward:  y = x * cos + rot(x) * sin        on the first R dims, the rest copied.
// Backward: g_x = g * cos - rot(g * sin)      (the transpose; exact for any tables).
// rot is rotate-half ([x1, x2] -> [-x2, x1], GPT-NeoX / HF) or interleaved ((x0, x1) -> (-x1, x0), GPT-J / Meta).
struct RopeTensor {
  const void* in;
  void* out;
  int64_t heads;
  int64_t in_stride[4];   // b, s, h, d(=1)
  int64_t out_stride[4];
};

struct RopeArgs {
  RopeTensor q, k;
  const void* cos;
  const void* sin;
  int64_t table_stride[3];  // b, s, r(=1)
  int64_t batch, seq, head_dim, rot_dim;
  DType dtype;        // q, k and outputs
  DType table_dtype;  // cos, sin
  bool interleaved;
  bool backward;
};

// LayerNorm / RMSNorm over the last dim of N rows of width D (rows contiguous), with an optional fused residual:
// h = x + residual (stored, rounded to the dtype), y = norm(h) * weight (+ bias).
// stats is float32 [2, N]: mean (0 for RMSNorm) and rstd.
struct NormFwdArgs {
  const void* x;
  const void* residual;  // may be null
  const void* weight;
  const void* bias;      // may be null
  void* y;
  void* h;               // written only when residual != null
  float* stats;
  int64_t rows, cols;
  float eps;
  bool rms;
  DType dtype;
};

// Backward: grad_x = d norm / d h applied to grad_y (+ grad_h when the summed residual was used downstream).
// grad_weight / grad_bias are column sums; partial (float32 [blocks, D] x 2) is scratch for them.
struct NormBwdArgs {
  const void* grad_y;
  const void* grad_h;    // may be null
  const void* h;
  const void* weight;
  const float* stats;
  void* grad_x;
  void* grad_weight;
  void* grad_bias;       // may be null
  float* partial;        // scratch, 2 * partial_blocks * cols floats
  int64_t partial_blocks;
  int64_t rows, cols;
  bool rms;
  DType dtype;
};

// Each launcher returns the CUDA error of its launch (cudaSuccess when none).
cudaError_t launch_rope(const RopeArgs& args, cudaStream_t stream);
cudaError_t launch_norm_forward(const NormFwdArgs& args, cudaStream_t stream);
cudaError_t launch_norm_backward(const NormBwdArgs& args, cudaStream_t stream);

}  // namespace megatron_fused
