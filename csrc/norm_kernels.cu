// Fused LayerNorm / RMSNorm with an optional residual add, forward and backward, fp32 / fp16 / bf16.
//
// A plain LayerNorm is already one kernel in torch; what pays is folding the residual add into it:
// h = x + residual and y = norm(h) * w + b in one pass over memory (x, residual read once; h, y written once).
// Statistics are float32 (two-pass variance for accuracy). The backward computes the input gradient per row and
// the weight/bias gradients as per-block partial column sums reduced by a second small kernel (deterministic).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "float_conversions.cuh"
#include "fused_kernels.h"

namespace megatron_fused {
namespace {

// Sum over the block; every thread gets the result. Safe to call repeatedly (syncs before reusing shared memory).
__device__ float block_sum(float value) {
  __shared__ float warp_sums[32];
  __shared__ float total;
  for (int offset = 16; offset > 0; offset /= 2) value += __shfl_down_sync(0xffffffffu, value, offset);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  __syncthreads();  // previous call's readers are done with warp_sums / total
  if (lane == 0) warp_sums[warp] = value;
  __syncthreads();
  if (warp == 0) {
    const int warps = (blockDim.x + 31) / 32;
    float v = lane < warps ? warp_sums[lane] : 0.0f;
    for (int offset = 16; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
    if (lane == 0) total = v;
  }
  __syncthreads();
  return total;
}

template <typename T>
__global__ void norm_forward_kernel(NormFwdArgs a) {
  const T* w = static_cast<const T*>(a.weight);
  const T* bias = static_cast<const T*>(a.bias);
  const float inv_cols = 1.0f / static_cast<float>(a.cols);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t base = row * a.cols;
    const T* x = static_cast<const T*>(a.x) + base;
    const T* r = a.residual ? static_cast<const T*>(a.residual) + base : nullptr;
    T* h = a.residual ? static_cast<T*>(a.h) + base : nullptr;
    const T* src = r ? h : x;  // the normalised input, re-read below (each thread reads back its own writes)
    float sum = 0.0f;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      float v = to_float<T>(x[c]);
      if (r) {
        const T rounded = from_float<T>(v + to_float<T>(r[c]));
        h[c] = rounded;
        v = to_float<T>(rounded);
      }
      sum += v;
    }
    const float mean = a.rms ? 0.0f : block_sum(sum) * inv_cols;
    float sq = 0.0f;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float d = to_float<T>(src[c]) - mean;
      sq += d * d;
    }
    const float rstd = 1.0f / sqrtf(block_sum(sq) * inv_cols + a.eps);
    T* y = static_cast<T*>(a.y) + base;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      float v = (to_float<T>(src[c]) - mean) * rstd * to_float<T>(w[c]);
      if (bias) v += to_float<T>(bias[c]);
      y[c] = from_float<T>(v);
    }
    if (threadIdx.x == 0) {
      a.stats[row] = mean;
      a.stats[a.rows + row] = rstd;
    }
  }
}

template <typename T>
__global__ void norm_backward_rows_kernel(NormBwdArgs a) {
  const T* w = static_cast<const T*>(a.weight);
  float* part_w = a.partial + blockIdx.x * a.cols;
  float* part_b = a.partial + (a.partial_blocks + blockIdx.x) * a.cols;
  for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
    part_w[c] = 0.0f;
    part_b[c] = 0.0f;
  }
  const float inv_cols = 1.0f / static_cast<float>(a.cols);
  for (int64_t row = blockIdx.x; row < a.rows; row += gridDim.x) {
    const int64_t base = row * a.cols;
    const T* g = static_cast<const T*>(a.grad_y) + base;
    const T* h = static_cast<const T*>(a.h) + base;
    const float mean = a.stats[row];
    const float rstd = a.stats[a.rows + row];
    float s1 = 0.0f, s2 = 0.0f;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float xhat = (to_float<T>(h[c]) - mean) * rstd;
      const float gy = to_float<T>(g[c]);
      const float gw = gy * to_float<T>(w[c]);
      s1 += gw;
      s2 += gw * xhat;
      part_w[c] += gy * xhat;  // each (block, column) slot belongs to one thread: no race
      part_b[c] += gy;
    }
    const float m1 = a.rms ? 0.0f : block_sum(s1) * inv_cols;
    const float m2 = block_sum(s2) * inv_cols;
    T* gx = static_cast<T*>(a.grad_x) + base;
    const T* gh = a.grad_h ? static_cast<const T*>(a.grad_h) + base : nullptr;
    for (int64_t c = threadIdx.x; c < a.cols; c += blockDim.x) {
      const float xhat = (to_float<T>(h[c]) - mean) * rstd;
      float v = rstd * (to_float<T>(g[c]) * to_float<T>(w[c]) - m1 - xhat * m2);
      if (gh) v += to_float<T>(gh[c]);
      gx[c] = from_float<T>(v);
    }
  }
}

template <typename T>
__global__ void norm_backward_columns_kernel(NormBwdArgs a) {
  T* gw = static_cast<T*>(a.grad_weight);
  T* gb = static_cast<T*>(a.grad_bias);
  for (int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; c < a.cols;
       c += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float sw = 0.0f, sb = 0.0f;
    for (int64_t k = 0; k < a.partial_blocks; ++k) {
      sw += a.partial[k * a.cols + c];
      sb += a.partial[(a.partial_blocks + k) * a.cols + c];
    }
    gw[c] = from_float<T>(sw);
    if (gb) gb[c] = from_float<T>(sb);
  }
}

int row_threads(int64_t cols) {
  int threads = 32;
  while (threads < 512 && threads * 4 < cols) threads *= 2;
  return threads;
}

unsigned int row_blocks(int64_t rows) {
  return static_cast<unsigned int>(rows < 65535 * 32 ? rows : 65535 * 32);
}

template <typename T>
cudaError_t forward_typed(const NormFwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0) return cudaSuccess;
  norm_forward_kernel<T><<<row_blocks(a.rows), row_threads(a.cols), 0, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t backward_typed(const NormBwdArgs& a, cudaStream_t stream) {
  if (a.rows == 0 || a.partial_blocks == 0) return cudaSuccess;
  norm_backward_rows_kernel<T><<<static_cast<unsigned int>(a.partial_blocks), row_threads(a.cols), 0, stream>>>(a);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int threads = 256;
  const unsigned int blocks = static_cast<unsigned int>((a.cols + threads - 1) / threads);
  norm_backward_columns_kernel<T><<<blocks, threads, 0, stream>>>(a);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_norm_forward(const NormFwdArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return forward_typed<float>(args, stream);
    case DType::kFloat16: return forward_typed<__half>(args, stream);
    case DType::kBFloat16: return forward_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_norm_backward(const NormBwdArgs& args, cudaStream_t stream) {
  switch (args.dtype) {
    case DType::kFloat32: return backward_typed<float>(args, stream);
    case DType::kFloat16: return backward_typed<__half>(args, stream);
    case DType::kBFloat16: return backward_typed<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace megatron_fused
