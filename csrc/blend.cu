// Representation blending (docs/algorithm.md §4 step 3) and its transpose, as torch.ops.repblend_fast.*.
//
//   blend_gather (x, perm, lam, out):  out[k,b] = lam[k] x[k,b] + (1-lam[k]) x[k, perm[k,b]]
//   blend_scatter(g, perm, lam, out):  out[k,j] = lam[k] g[k,j] + (1-lam[k]) sum_{i: perm[k,i]=j} g[k,i]
//
// x, g, out: [K, B, D] contiguous, one floating dtype; perm: [K, B] int64 contiguous; lam: [1] or [K]
// contiguous in the accumulation dtype (float32, or float64 for float64 inputs). The caller allocates
// `out` (so tests can poison it). The scatter loops over the B source rows in a fixed order instead of
// using atomics: deterministic, and exact for any in-range index row. Index values are validated by
// the Python layer (repblend_fast/ops/blend.py); out-of-range values here are undefined behaviour.
// Loads are 16-byte vectors when D and the base pointers allow it; arithmetic in fp32 (fp64).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>

namespace repblend_fast {
namespace {

constexpr int kBlendThreads = 256;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) BlendVec {
  scalar_t v[VEC];
};

template <typename scalar_t, typename acc_t, int VEC>
__global__ void blend_gather_kernel(const scalar_t* __restrict__ x, const int64_t* __restrict__ perm,
                                    const acc_t* __restrict__ lam, scalar_t* __restrict__ out,
                                    int64_t B, int64_t D, int64_t lam_stride) {
  using V = BlendVec<scalar_t, VEC>;
  const int64_t row = blockIdx.x;  // k * B + b
  const int64_t k = row / B;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col >= D) return;
  const int64_t src = k * B + __ldg(perm + row);
  const acc_t l = lam[k * lam_stride];
  const acc_t m = acc_t(1) - l;
  const V a = *reinterpret_cast<const V*>(x + row * D + col);
  const V b = *reinterpret_cast<const V*>(x + src * D + col);
  V o;
#pragma unroll
  for (int j = 0; j < VEC; ++j) {
    o.v[j] = static_cast<scalar_t>(l * static_cast<acc_t>(a.v[j]) + m * static_cast<acc_t>(b.v[j]));
  }
  *reinterpret_cast<V*>(out + row * D + col) = o;
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void blend_scatter_kernel(const scalar_t* __restrict__ g, const int64_t* __restrict__ perm,
                                     const acc_t* __restrict__ lam, scalar_t* __restrict__ out,
                                     int64_t B, int64_t D, int64_t lam_stride) {
  using V = BlendVec<scalar_t, VEC>;
  const int64_t row = blockIdx.x;  // k * B + j: the destination row
  const int64_t k = row / B;
  const int64_t j = row - k * B;
  const int64_t col = (static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x) * VEC;
  if (col >= D) return;
  const acc_t l = lam[k * lam_stride];
  const acc_t m = acc_t(1) - l;
  acc_t acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = acc_t(0);
  const int64_t* prow = perm + k * B;
  for (int64_t i = 0; i < B; ++i) {
    if (__ldg(prow + i) != j) continue;  // uniform across the block: no divergence
    const V gi = *reinterpret_cast<const V*>(g + (k * B + i) * D + col);
#pragma unroll
    for (int e = 0; e < VEC; ++e) acc[e] += static_cast<acc_t>(gi.v[e]);
  }
  const V gj = *reinterpret_cast<const V*>(g + row * D + col);
  V o;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    o.v[e] = static_cast<scalar_t>(l * static_cast<acc_t>(gj.v[e]) + m * acc[e]);
  }
  *reinterpret_cast<V*>(out + row * D + col) = o;
}

void check_blend_args(const char* op, const at::Tensor& x, const at::Tensor& perm,
                      const at::Tensor& lam, const at::Tensor& out) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor");
  TORCH_CHECK(x.dim() == 3, op, ": x must be [K, B, D], got ", x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": x must be floating, got ",
              x.scalar_type());
  TORCH_CHECK(perm.device() == x.device() && lam.device() == x.device() &&
                  out.device() == x.device(),
              op, ": x, perm, lam and out must be on one device");
  TORCH_CHECK(perm.scalar_type() == at::kLong, op, ": perm must be int64, got ",
              perm.scalar_type());
  TORCH_CHECK(perm.dim() == 2 && perm.size(0) == x.size(0) && perm.size(1) == x.size(1), op,
              ": perm must be [K, B] = [", x.size(0), ", ", x.size(1), "], got ", perm.sizes());
  TORCH_CHECK(perm.is_contiguous(), op, ": perm must be contiguous");
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(lam.scalar_type() == acc, op, ": lam must be ", acc, " for x of ", x.scalar_type(),
              ", got ", lam.scalar_type());
  TORCH_CHECK(lam.dim() == 1 && (lam.size(0) == 1 || lam.size(0) == x.size(0)), op,
              ": lam must be [1] or [K], got ", lam.sizes());
  TORCH_CHECK(lam.is_contiguous(), op, ": lam must be contiguous");
  TORCH_CHECK(out.sizes() == x.sizes() && out.scalar_type() == x.scalar_type() &&
                  out.is_contiguous(),
              op, ": out must be a contiguous tensor with x's shape and dtype");
}

template <typename scalar_t, typename acc_t, int VEC>
void launch_blend(bool scatter, const at::Tensor& x, const at::Tensor& perm, const at::Tensor& lam,
                  at::Tensor& out) {
  const int64_t K = x.size(0), B = x.size(1), D = x.size(2);
  const int64_t per_block = static_cast<int64_t>(kBlendThreads) * VEC;
  const int64_t col_blocks = (D + per_block - 1) / per_block;
  TORCH_CHECK(K * B <= INT32_MAX && col_blocks <= 65535, "blend: K*B or D too large for the grid");
  const dim3 grid(static_cast<unsigned>(K * B), static_cast<unsigned>(col_blocks));
  const int64_t lam_stride = lam.size(0) == 1 ? 0 : 1;
  auto stream = c10::cuda::getCurrentCUDAStream();
  if (scatter) {
    blend_scatter_kernel<scalar_t, acc_t, VEC><<<grid, kBlendThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(), lam.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), B, D, lam_stride);
  } else {
    blend_gather_kernel<scalar_t, acc_t, VEC><<<grid, kBlendThreads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), perm.const_data_ptr<int64_t>(), lam.const_data_ptr<acc_t>(),
        out.mutable_data_ptr<scalar_t>(), B, D, lam_stride);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void blend_impl(const char* op, bool scatter, const at::Tensor& x, const at::Tensor& perm,
                const at::Tensor& lam, at::Tensor out) {
  check_blend_args(op, x, perm, lam, out);
  if (x.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "blend", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool aligned = x.size(2) % kVec == 0 &&
                         reinterpret_cast<uintptr_t>(x.const_data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out.const_data_ptr()) % 16 == 0;
    if (aligned) {
      launch_blend<scalar_t, acc_t, kVec>(scatter, x, perm, lam, out);
    } else {
      launch_blend<scalar_t, acc_t, 1>(scatter, x, perm, lam, out);
    }
  });
}

void blend_gather(const at::Tensor& x, const at::Tensor& perm, const at::Tensor& lam,
                  at::Tensor out) {
  blend_impl("blend_gather", false, x, perm, lam, out);
}

void blend_scatter(const at::Tensor& g, const at::Tensor& perm, const at::Tensor& lam,
                   at::Tensor out) {
  blend_impl("blend_scatter", true, g, perm, lam, out);
}

}  // namespace
}  // namespace repblend_fast

TORCH_LIBRARY_FRAGMENT(repblend_fast, m) {
  m.def("blend_gather(Tensor x, Tensor perm, Tensor lam, Tensor(a!) out) -> ()");
  m.def("blend_scatter(Tensor g, Tensor perm, Tensor lam, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(repblend_fast, CUDA, m) {
  m.impl("blend_gather", &repblend_fast::blend_gather);
  m.impl("blend_scatter", &repblend_fast::blend_scatter);
}
