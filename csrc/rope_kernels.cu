// Fused rotary position embedding for q and k (forward and backward), fp32 / fp16 / bf16.
//
// One thread block per token (b, s): the block first loads the token's cos/sin row into shared memory as float,
// then every thread rotates elements of all q heads and all k heads of that token. Math is in float32, each output
// is rounded once. Positions are whatever produced the tables, so per-token positions (KV-cache decode offsets,
// left padding, BiPE-style ids) need nothing special here.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "float_conversions.cuh"
#include "fused_kernels.h"

namespace megatron_fused {
namespace {

// Partner index of dim i inside the rotated part and the sign of the partner term in rot(x)[i].
__device__ __forceinline__ void rope_pair(int64_t i, int64_t rot_dim, bool interleaved, int64_t* partner,
                                          float* sign) {
  if (interleaved) {
    const bool first = (i % 2) == 0;
    *partner = first ? i + 1 : i - 1;
    *sign = first ? -1.0f : 1.0f;
  } else {
    const int64_t half = rot_dim / 2;
    const bool first = i < half;
    *partner = first ? i + half : i - half;
    *sign = first ? -1.0f : 1.0f;
  }
}

template <typename T>
__device__ void rotate_tensor(const RopeTensor& t, int64_t b, int64_t s, int64_t head_dim, int64_t rot_dim,
                              bool interleaved, bool backward, const float* cos_row, const float* sin_row) {
  const T* in = static_cast<const T*>(t.in);
  T* out = static_cast<T*>(t.out);
  const int64_t total = t.heads * head_dim;
  const int64_t in_base = b * t.in_stride[0] + s * t.in_stride[1];
  const int64_t out_base = b * t.out_stride[0] + s * t.out_stride[1];
  for (int64_t e = threadIdx.x; e < total; e += blockDim.x) {
    const int64_t h = e / head_dim;
    const int64_t i = e - h * head_dim;
    const int64_t src = in_base + h * t.in_stride[2];
    float value = to_float<T>(in[src + i]);
    if (i < rot_dim) {
      int64_t p;
      float sign;
      rope_pair(i, rot_dim, interleaved, &p, &sign);
      const float partner = to_float<T>(in[src + p]);
      // forward: x_i cos_i + sign x_p sin_i ; backward (transpose): g_i cos_i - sign g_p sin_p
      value = backward ? value * cos_row[i] - sign * partner * sin_row[p]
                       : value * cos_row[i] + sign * partner * sin_row[i];
    }
    out[out_base + h * t.out_stride[2] + i] = from_float<T>(value);
  }
}

template <typename T, typename C>
__global__ void rope_kernel(RopeArgs a) {
  extern __shared__ float table[];  // cos row then sin row, rot_dim each
  float* cos_row = table;
  float* sin_row = table + a.rot_dim;
  const int64_t token = blockIdx.x;
  const int64_t b = token / a.seq;
  const int64_t s = token - b * a.seq;
  const C* cos = static_cast<const C*>(a.cos);
  const C* sin = static_cast<const C*>(a.sin);
  const int64_t table_base = b * a.table_stride[0] + s * a.table_stride[1];
  for (int64_t i = threadIdx.x; i < a.rot_dim; i += blockDim.x) {
    cos_row[i] = to_float<C>(cos[table_base + i]);
    sin_row[i] = to_float<C>(sin[table_base + i]);
  }
  __syncthreads();
  rotate_tensor<T>(a.q, b, s, a.head_dim, a.rot_dim, a.interleaved, a.backward, cos_row, sin_row);
  rotate_tensor<T>(a.k, b, s, a.head_dim, a.rot_dim, a.interleaved, a.backward, cos_row, sin_row);
}

template <typename T, typename C>
cudaError_t launch_typed(const RopeArgs& a, cudaStream_t stream) {
  const int64_t tokens = a.batch * a.seq;
  if (tokens == 0) return cudaSuccess;
  const int64_t work = (a.q.heads > a.k.heads ? a.q.heads : a.k.heads) * a.head_dim;
  int threads = 128;
  while (threads < 512 && threads < work) threads *= 2;
  const size_t shared = 2 * static_cast<size_t>(a.rot_dim) * sizeof(float);
  rope_kernel<T, C><<<static_cast<unsigned int>(tokens), threads, shared, stream>>>(a);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_table(const RopeArgs& a, cudaStream_t stream) {
  switch (a.table_dtype) {
    case DType::kFloat32: return launch_typed<T, float>(a, stream);
    case DType::kFloat16: return launch_typed<T, __half>(a, stream);
    case DType::kBFloat16: return launch_typed<T, __nv_bfloat16>(a, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_rope(const RopeArgs& args, cudaStream_t stream) {
  if (args.batch * args.seq > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  switch (args.dtype) {
    case DType::kFloat32: return launch_table<float>(args, stream);
    case DType::kFloat16: return launch_table<__half>(args, stream);
    case DType::kBFloat16: return launch_table<__nv_bfloat16>(args, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace megatron_fused
