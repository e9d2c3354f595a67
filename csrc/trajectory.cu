// Flattened-parameter trajectory reductions (docs/algorithm.md §4 step 4, §5, §11e), as torch.ops.repblend_fast.*.
//
// A fixed two-stage reduction, bit-identical from run to run (no atomics):
//   1. trajectory_*_partials: block p of a piece reduces elements [p*kChunk, (p+1)*kChunk) and writes
//      one partial per channel into column offset + p of partials [C, P] (fp32, fp64 for fp64 inputs);
//      the caller launches it once per piece of a vector, with increasing offsets;
//   2. trajectory_finalize: one block sums the [C, P] buffer in a fixed order -> [C] (+ num/den).
// Inputs are read with 16-byte vector loads when aligned, converted to the accumulation type at once.
//
//   trajectory_distance_partials(student, start, target, partials, offset):
//       C = 2: ||student - target||^2, ||start - target||^2
//   trajectory_terms_partials(start, target, grad_sum, lr, direction, partials, offset):
//       C = 3: ||D||^2, ||r||^2, r.G with D = target - start, r = D + lr G; writes direction = lr r
//   trajectory_finalize(partials, ratio) -> [C] or [C + 1] with partials[0] / partials[1] appended
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

namespace repblend_fast {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Elements per block of the partial kernels; mirrored by CUDA_CHUNK in repblend_fast/ops/trajectory.py.
constexpr int64_t kChunk = 8192;

template <typename scalar_t, int VEC>
struct alignas(sizeof(scalar_t) * VEC) TrajVec {
  scalar_t v[VEC];
};

// Fixed-order block sum of NCH values per thread; thread 0 receives the totals.
template <typename acc_t, int NCH>
__device__ __forceinline__ void block_sum(acc_t (&v)[NCH]) {
  __shared__ acc_t smem[NCH][kWarps];
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
#pragma unroll
  for (int c = 0; c < NCH; ++c) {
#pragma unroll
    for (int off = 16; off > 0; off /= 2) v[c] += __shfl_down_sync(0xffffffffu, v[c], off);
    if (lane == 0) smem[c][warp] = v[c];
  }
  __syncthreads();
  if (threadIdx.x == 0) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
      acc_t s = smem[c][0];
      for (int w = 1; w < kWarps; ++w) s += smem[c][w];
      v[c] = s;
    }
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    distance_partials_kernel(const scalar_t* __restrict__ s, const scalar_t* __restrict__ a,
                             const scalar_t* __restrict__ t, acc_t* __restrict__ part, int64_t n,
                             int64_t P, int64_t offset) {
  using V = TrajVec<scalar_t, VEC>;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t len = n - begin < kChunk ? n - begin : kChunk;
  const int64_t nvec = len / VEC;
  acc_t acc[2] = {acc_t(0), acc_t(0)};
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    const int64_t e = begin + i * VEC;
    const V sv = *reinterpret_cast<const V*>(s + e);
    const V av = *reinterpret_cast<const V*>(a + e);
    const V tv = *reinterpret_cast<const V*>(t + e);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t tj = static_cast<acc_t>(tv.v[j]);
      const acc_t dn = static_cast<acc_t>(sv.v[j]) - tj;
      const acc_t dd = static_cast<acc_t>(av.v[j]) - tj;
      acc[0] += dn * dn;
      acc[1] += dd * dd;
    }
  }
  for (int64_t e = begin + nvec * VEC + threadIdx.x; e < begin + len; e += kThreads) {
    const acc_t tj = static_cast<acc_t>(t[e]);
    const acc_t dn = static_cast<acc_t>(s[e]) - tj;
    const acc_t dd = static_cast<acc_t>(a[e]) - tj;
    acc[0] += dn * dn;
    acc[1] += dd * dd;
  }
  block_sum<acc_t, 2>(acc);
  if (threadIdx.x == 0) {
    const int64_t col = offset + blockIdx.x;
    part[col] = acc[0];
    part[P + col] = acc[1];
  }
}

template <typename scalar_t, typename acc_t, int VEC>
__global__ void __launch_bounds__(kThreads)
    terms_partials_kernel(const scalar_t* __restrict__ a, const scalar_t* __restrict__ t,
                          const scalar_t* __restrict__ g, const acc_t* __restrict__ lr_ptr,
                          scalar_t* __restrict__ dir, acc_t* __restrict__ part, int64_t n, int64_t P,
                          int64_t offset) {
  using V = TrajVec<scalar_t, VEC>;
  const acc_t lr = *lr_ptr;
  const int64_t begin = static_cast<int64_t>(blockIdx.x) * kChunk;
  const int64_t len = n - begin < kChunk ? n - begin : kChunk;
  const int64_t nvec = len / VEC;
  acc_t acc[3] = {acc_t(0), acc_t(0), acc_t(0)};
  for (int64_t i = threadIdx.x; i < nvec; i += kThreads) {
    const int64_t e = begin + i * VEC;
    const V av = *reinterpret_cast<const V*>(a + e);
    const V tv = *reinterpret_cast<const V*>(t + e);
    const V gv = *reinterpret_cast<const V*>(g + e);
    V dv;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const acc_t gj = static_cast<acc_t>(gv.v[j]);
      const acc_t delta = static_cast<acc_t>(tv.v[j]) - static_cast<acc_t>(av.v[j]);
      const acc_t r = delta + lr * gj;
      acc[0] += delta * delta;
      acc[1] += r * r;
      acc[2] += r * gj;
      dv.v[j] = static_cast<scalar_t>(lr * r);
    }
    *reinterpret_cast<V*>(dir + e) = dv;
  }
  for (int64_t e = begin + nvec * VEC + threadIdx.x; e < begin + len; e += kThreads) {
    const acc_t gj = static_cast<acc_t>(g[e]);
    const acc_t delta = static_cast<acc_t>(t[e]) - static_cast<acc_t>(a[e]);
    const acc_t r = delta + lr * gj;
    acc[0] += delta * delta;
    acc[1] += r * r;
    acc[2] += r * gj;
    dir[e] = static_cast<scalar_t>(lr * r);
  }
  block_sum<acc_t, 3>(acc);
  if (threadIdx.x == 0) {
    const int64_t col = offset + blockIdx.x;
    part[col] = acc[0];
    part[P + col] = acc[1];
    part[2 * P + col] = acc[2];
  }
}

template <typename acc_t, int NCH>
__global__ void __launch_bounds__(kThreads)
    finalize_kernel(const acc_t* __restrict__ part, acc_t* __restrict__ out, int64_t P, bool ratio) {
  acc_t acc[NCH];
#pragma unroll
  for (int c = 0; c < NCH; ++c) acc[c] = acc_t(0);
  for (int64_t i = threadIdx.x; i < P; i += kThreads) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) acc[c] += part[c * P + i];
  }
  block_sum<acc_t, NCH>(acc);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int c = 0; c < NCH; ++c) out[c] = acc[c];
    if (ratio) out[NCH] = acc[0] / acc[1];
  }
}

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

at::ScalarType acc_type_of(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_vector(const char* op, const char* name, const at::Tensor& x, const at::Tensor& ref) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor");
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " is on ", x.device(), ", expected ",
              ref.device());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " has dtype ", x.scalar_type(),
              ", expected ", ref.scalar_type());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), op, ": ", name, " must be floating");
  TORCH_CHECK(x.numel() == ref.numel(), op, ": ", name, " has ", x.numel(), " elements, expected ",
              ref.numel());
}

void check_partials(const char* op, const at::Tensor& part, int64_t nch, const at::Tensor& ref,
                    int64_t offset) {
  TORCH_CHECK(part.device() == ref.device(), op, ": partials must be on ", ref.device());
  TORCH_CHECK(part.is_contiguous() && part.dim() == 2 && part.size(0) == nch, op,
              ": partials must be a contiguous [", nch, ", P] tensor, got ", part.sizes());
  TORCH_CHECK(part.scalar_type() == acc_type_of(ref.scalar_type()), op, ": partials must be ",
              acc_type_of(ref.scalar_type()), ", got ", part.scalar_type());
  const int64_t blocks = (ref.numel() + kChunk - 1) / kChunk;
  TORCH_CHECK(offset >= 0 && offset + blocks <= part.size(1), op, ": partials has ", part.size(1),
              " columns, need offset ", offset, " + ", blocks, " blocks of ", kChunk, " elements");
  TORCH_CHECK(blocks <= INT32_MAX, op, ": vector too long");
}

void trajectory_distance_partials(const at::Tensor& student, const at::Tensor& start,
                                  const at::Tensor& target, at::Tensor partials, int64_t offset) {
  const char* op = "trajectory_distance_partials";
  check_vector(op, "student", student, student);
  check_vector(op, "start", start, student);
  check_vector(op, "target", target, student);
  check_partials(op, partials, 2, student, offset);
  const int64_t n = student.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(student.device());
  const unsigned blocks = static_cast<unsigned>((n + kChunk - 1) / kChunk);
  const int64_t P = partials.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "trajectory_distance_partials", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = aligned16(student.const_data_ptr()) && aligned16(start.const_data_ptr()) &&
                     aligned16(target.const_data_ptr());
    auto* part = partials.mutable_data_ptr<acc_t>();
    if (vec) {
      distance_partials_kernel<scalar_t, acc_t, kVec><<<blocks, kThreads, 0, stream>>>(
          student.const_data_ptr<scalar_t>(), start.const_data_ptr<scalar_t>(),
          target.const_data_ptr<scalar_t>(), part, n, P, offset);
    } else {
      distance_partials_kernel<scalar_t, acc_t, 1><<<blocks, kThreads, 0, stream>>>(
          student.const_data_ptr<scalar_t>(), start.const_data_ptr<scalar_t>(),
          target.const_data_ptr<scalar_t>(), part, n, P, offset);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void trajectory_terms_partials(const at::Tensor& start, const at::Tensor& target,
                               const at::Tensor& grad_sum, const at::Tensor& lr,
                               at::Tensor direction, at::Tensor partials, int64_t offset) {
  const char* op = "trajectory_terms_partials";
  check_vector(op, "start", start, start);
  check_vector(op, "target", target, start);
  check_vector(op, "grad_sum", grad_sum, start);
  check_vector(op, "direction", direction, start);
  check_partials(op, partials, 3, start, offset);
  TORCH_CHECK(lr.device() == start.device() && lr.numel() == 1 &&
                  lr.scalar_type() == acc_type_of(start.scalar_type()),
              op, ": lr must be a one-element ", acc_type_of(start.scalar_type()), " tensor on ",
              start.device());
  const int64_t n = start.numel();
  if (n == 0) return;
  const c10::cuda::CUDAGuard guard(start.device());
  const unsigned blocks = static_cast<unsigned>((n + kChunk - 1) / kChunk);
  const int64_t P = partials.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, start.scalar_type(), "trajectory_terms_partials", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    constexpr int kVec = 16 / sizeof(scalar_t);
    const bool vec = aligned16(start.const_data_ptr()) && aligned16(target.const_data_ptr()) &&
                     aligned16(grad_sum.const_data_ptr()) && aligned16(direction.const_data_ptr());
    auto* part = partials.mutable_data_ptr<acc_t>();
    auto* dir = direction.mutable_data_ptr<scalar_t>();
    const auto* lr_p = lr.const_data_ptr<acc_t>();
    if (vec) {
      terms_partials_kernel<scalar_t, acc_t, kVec><<<blocks, kThreads, 0, stream>>>(
          start.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
          grad_sum.const_data_ptr<scalar_t>(), lr_p, dir, part, n, P, offset);
    } else {
      terms_partials_kernel<scalar_t, acc_t, 1><<<blocks, kThreads, 0, stream>>>(
          start.const_data_ptr<scalar_t>(), target.const_data_ptr<scalar_t>(),
          grad_sum.const_data_ptr<scalar_t>(), lr_p, dir, part, n, P, offset);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

at::Tensor trajectory_finalize(const at::Tensor& partials, bool ratio) {
  const char* op = "trajectory_finalize";
  TORCH_CHECK(partials.is_cuda(), op, ": partials must be a CUDA tensor");
  TORCH_CHECK(partials.dim() == 2 && partials.is_contiguous() &&
                  (partials.size(0) == 2 || partials.size(0) == 3),
              op, ": partials must be a contiguous [2 or 3, P] tensor, got ", partials.sizes());
  TORCH_CHECK(partials.scalar_type() == at::kFloat || partials.scalar_type() == at::kDouble, op,
              ": partials must be float32 or float64, got ", partials.scalar_type());
  const int64_t nch = partials.size(0);
  TORCH_CHECK(!ratio || nch == 2, op, ": ratio needs 2 channels (num, den)");
  const c10::cuda::CUDAGuard guard(partials.device());
  at::Tensor out = at::full({nch + (ratio ? 1 : 0)}, std::numeric_limits<double>::quiet_NaN(),
                            partials.options());
  const int64_t P = partials.size(1);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(partials.scalar_type(), "trajectory_finalize", [&] {
    if (nch == 2) {
      finalize_kernel<scalar_t, 2><<<1, kThreads, 0, stream>>>(
          partials.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), P, ratio);
    } else {
      finalize_kernel<scalar_t, 3><<<1, kThreads, 0, stream>>>(
          partials.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), P, ratio);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace
}  // namespace repblend_fast

TORCH_LIBRARY_FRAGMENT(repblend_fast, m) {
  m.def(
      "trajectory_distance_partials(Tensor student, Tensor start, Tensor target, "
      "Tensor(a!) partials, int offset) -> ()");
  m.def(
      "trajectory_terms_partials(Tensor start, Tensor target, Tensor grad_sum, Tensor lr, "
      "Tensor(a!) direction, Tensor(b!) partials, int offset) -> ()");
  m.def("trajectory_finalize(Tensor partials, bool ratio) -> Tensor");
}

TORCH_LIBRARY_IMPL(repblend_fast, CUDA, m) {
  m.impl("trajectory_distance_partials", &repblend_fast::trajectory_distance_partials);
  m.impl("trajectory_terms_partials", &repblend_fast::trajectory_terms_partials);
  m.impl("trajectory_finalize", &repblend_fast::trajectory_finalize);
}
