// Python binding of the fused RoPE and LayerNorm/RMSNorm CUDA kernels (module megatron_fused_kernels).
//
// Only the torch custom ops in megatron/kernels/ call these functions; they pass tensors that are already laid out
// as documented in fused_kernels.h, and this file checks that contract (device, dtype, shapes, strides) so a misuse
// fails with a message instead of reading out of bounds. It includes only the ATen / pybind headers it uses
// (not torch/extension.h, the whole C++ frontend), which halves its compile time.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "fused_kernels.h"

namespace megatron_fused {
namespace {

DType dtype_of(const at::Tensor& t, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    default: TORCH_CHECK(false, name, ": fused kernels take float32, float16 or bfloat16, got ", t.scalar_type());
  }
}

void check_cuda(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.is_cuda(), name, " must be a CUDA tensor");
  TORCH_CHECK(t.device() == like.device(), name, " is on ", t.device(), ", expected ", like.device());
}

void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " kernel launch failed: ", cudaGetErrorString(err));
}

RopeTensor rope_tensor(const at::Tensor& in, const at::Tensor& out, const char* name) {
  TORCH_CHECK(in.dim() == 4 && out.sizes() == in.sizes(), name, ": expected [B, S, H, D] input and output of the "
              "same shape, got ", in.sizes(), " and ", out.sizes());
  TORCH_CHECK(in.stride(3) == 1 && out.stride(3) == 1, name, ": the head dim must be contiguous (stride 1)");
  RopeTensor t{};
  t.in = in.data_ptr();
  t.out = out.data_ptr();
  t.heads = in.size(2);
  for (int d = 0; d < 4; ++d) {
    t.in_stride[d] = in.stride(d);
    t.out_stride[d] = out.stride(d);
  }
  return t;
}

void rope(const at::Tensor& q, const at::Tensor& k, const at::Tensor& cos, const at::Tensor& sin,
          const at::Tensor& out_q, const at::Tensor& out_k, bool interleaved, bool backward) {
  for (const auto* t : {&k, &cos, &sin, &out_q, &out_k}) check_cuda(*t, "rope operand", q);
  check_cuda(q, "q", q);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && out_q.scalar_type() == q.scalar_type() &&
              out_k.scalar_type() == q.scalar_type(), "rope: q, k and the outputs must share one dtype");
  TORCH_CHECK(sin.scalar_type() == cos.scalar_type(), "rope: cos and sin must share one dtype");
  TORCH_CHECK(cos.dim() == 3 && sin.sizes() == cos.sizes(), "rope: cos/sin must be [B, S, R], got ", cos.sizes(),
              " and ", sin.sizes());
  TORCH_CHECK(cos.stride(2) == 1 && sin.stride(2) == 1 && cos.strides() == sin.strides(),
              "rope: cos/sin need equal strides and a contiguous last dim");
  TORCH_CHECK(k.size(0) == q.size(0) && k.size(1) == q.size(1) && k.size(3) == q.size(3),
              "rope: q ", q.sizes(), " and k ", k.sizes(), " differ in batch, sequence or head dim");
  const int64_t rot = cos.size(2);
  TORCH_CHECK(rot % 2 == 0 && rot <= q.size(3), "rope: rotated dims ", rot, " must be even and <= head dim ",
              q.size(3));
  TORCH_CHECK(cos.size(1) == q.size(1) && (cos.size(0) == q.size(0) || cos.size(0) == 1),
              "rope: cos/sin ", cos.sizes(), " do not match q ", q.sizes());
  RopeArgs a{};
  a.q = rope_tensor(q, out_q, "q");
  a.k = rope_tensor(k, out_k, "k");
  a.cos = cos.data_ptr();
  a.sin = sin.data_ptr();
  a.table_stride[0] = cos.size(0) == 1 ? 0 : cos.stride(0);
  a.table_stride[1] = cos.stride(1);
  a.table_stride[2] = 1;
  a.batch = q.size(0);
  a.seq = q.size(1);
  a.head_dim = q.size(3);
  a.rot_dim = rot;
  a.dtype = dtype_of(q, "q");
  a.table_dtype = dtype_of(cos, "cos");
  a.interleaved = interleaved;
  a.backward = backward;
  const c10::cuda::CUDAGuard guard(q.device());
  check_launch(launch_rope(a, c10::cuda::getCurrentCUDAStream().stream()), "rope");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_forward(const at::Tensor& x,
                                                            const std::optional<at::Tensor>& residual,
                                                            const at::Tensor& weight,
                                                            const std::optional<at::Tensor>& bias, double eps,
                                                            bool rms) {
  check_cuda(x, "x", x);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "norm: x must be a contiguous [rows, cols] tensor");
  const int64_t rows = x.size(0), cols = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == cols && weight.is_contiguous(), "norm: weight must be [", cols,
              "] and contiguous");
  check_cuda(weight, "weight", x);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "norm: weight dtype ", weight.scalar_type(),
              " differs from x dtype ", x.scalar_type());
  const bool has_res = residual.has_value() && residual->defined();
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_res) {
    check_cuda(*residual, "residual", x);
    TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                residual->scalar_type() == x.scalar_type(), "norm: residual must match x (shape, dtype, contiguous)");
  }
  if (has_bias) {
    check_cuda(*bias, "bias", x);
    TORCH_CHECK(bias->sizes() == weight.sizes() && bias->is_contiguous() && bias->scalar_type() == x.scalar_type(),
                "norm: bias must match weight (shape, dtype, contiguous)");
  }
  auto y = at::empty_like(x);
  auto h = has_res ? at::empty_like(x) : at::empty({0}, x.options());
  auto stats = at::empty({2, rows}, x.options().dtype(at::kFloat));
  NormFwdArgs a{};
  a.x = x.data_ptr();
  a.residual = has_res ? residual->data_ptr() : nullptr;
  a.weight = weight.data_ptr();
  a.bias = has_bias ? bias->data_ptr() : nullptr;
  a.y = y.data_ptr();
  a.h = has_res ? h.data_ptr() : nullptr;
  a.stats = stats.data_ptr<float>();
  a.rows = rows;
  a.cols = cols;
  a.eps = static_cast<float>(eps);
  a.rms = rms;
  a.dtype = dtype_of(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(launch_norm_forward(a, c10::cuda::getCurrentCUDAStream().stream()), "norm forward");
  return {y, h, stats};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> norm_backward(const at::Tensor& grad_y,
                                                             const std::optional<at::Tensor>& grad_h,
                                                             const at::Tensor& h, const at::Tensor& weight,
                                                             const at::Tensor& stats, bool rms, bool has_bias) {
  check_cuda(grad_y, "grad_y", h);
  check_cuda(h, "h", h);
  check_cuda(weight, "weight", h);
  check_cuda(stats, "stats", h);
  TORCH_CHECK(h.dim() == 2 && h.is_contiguous() && grad_y.sizes() == h.sizes() && grad_y.is_contiguous() &&
              grad_y.scalar_type() == h.scalar_type(), "norm backward: grad_y and h must be contiguous [rows, cols] "
              "tensors of one dtype");
  const int64_t rows = h.size(0), cols = h.size(1);
  TORCH_CHECK(stats.scalar_type() == at::kFloat && stats.dim() == 2 && stats.size(0) == 2 && stats.size(1) == rows &&
              stats.is_contiguous(), "norm backward: stats must be float32 [2, rows]");
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == cols && weight.scalar_type() == h.scalar_type() &&
              weight.is_contiguous(), "norm backward: weight must be [cols] in the input dtype");
  const bool has_gh = grad_h.has_value() && grad_h->defined();
  if (has_gh) {
    check_cuda(*grad_h, "grad_h", h);
    TORCH_CHECK(grad_h->sizes() == h.sizes() && grad_h->is_contiguous() && grad_h->scalar_type() == h.scalar_type(),
                "norm backward: grad_h must match h (shape, dtype, contiguous)");
  }
  const c10::cuda::CUDAGuard guard(h.device());
  int sms = 0;
  TORCH_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, h.device().index()) == cudaSuccess,
              "norm backward: cannot read the multiprocessor count");
  const int64_t blocks = std::min<int64_t>(rows, 4 * static_cast<int64_t>(sms > 0 ? sms : 1));
  auto grad_x = at::empty_like(h);
  auto grad_w = at::empty_like(weight);
  auto grad_b = has_bias ? at::empty_like(weight) : at::empty({0}, weight.options());
  auto partial = at::empty({2, std::max<int64_t>(blocks, 1), cols}, h.options().dtype(at::kFloat));
  if (rows == 0) {
    grad_w.zero_();
    grad_b.zero_();
    return {grad_x, grad_w, grad_b};
  }
  NormBwdArgs a{};
  a.grad_y = grad_y.data_ptr();
  a.grad_h = has_gh ? grad_h->data_ptr() : nullptr;
  a.h = h.data_ptr();
  a.weight = weight.data_ptr();
  a.stats = stats.data_ptr<float>();
  a.grad_x = grad_x.data_ptr();
  a.grad_weight = grad_w.data_ptr();
  a.grad_bias = has_bias ? grad_b.data_ptr() : nullptr;
  a.partial = partial.data_ptr<float>();
  a.partial_blocks = blocks;
  a.rows = rows;
  a.cols = cols;
  a.rms = rms;
  a.dtype = dtype_of(h, "h");
  check_launch(launch_norm_backward(a, c10::cuda::getCurrentCUDAStream().stream()), "norm backward");
  return {grad_x, grad_w, grad_b};
}

}  // namespace
}  // namespace megatron_fused

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Fused RoPE and LayerNorm/RMSNorm CUDA kernels of SepLLM-NeoX (called through megatron.kernels)";
  m.def("rope", &megatron_fused::rope, "rotary embedding of q and k (forward or backward) into given outputs");
  m.def("norm_forward", &megatron_fused::norm_forward, "LayerNorm/RMSNorm forward with optional residual add");
  m.def("norm_backward", &megatron_fused::norm_backward, "LayerNorm/RMSNorm backward");
}
