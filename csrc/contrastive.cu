// Fused soft-target contrastive losses (docs/algorithm.md §7): forward with saved statistics and the
// first-order backward, registered as torch.ops.repblend_fast.contrastive_fwd / contrastive_bwd.
//
// Same algorithm and saved-statistics layout as kernels/contrastive.py (the Python autograd layer
// in repblend_fast/ops/contrastive.py drives both and owns the double backward):
//   forward:  row norms -> cos = norm(img) norm(txt)^T (shared-memory tiles over D) -> one block per
//             problem computes the loss and, per direction and row, [lse(Z), sum S, A, lse(10 S)]
//             (A = sum S (Z - lse) for InfoNCE/CWCL, the row KL for KL) and the WBCE counts;
//   backward: one block per problem writes dcos = g s dL/dZ, dtarget and dscale; then one block per
//             (problem, row, side) forms dx_j = r_j (du_j - [|x_j| >= 1e-12] u_j (u_j . du_j)).
//   row_parallel (large B, few problems): the loss and dL/dZ steps split each problem into row
//             (and column) blocks writing partial sums, then one fixed-order combine per problem.
// Inputs: img, txt [K, B, D] and target [K, B, B] of one dtype (fp32, fp16 or bf16), scale [K]
// fp32; all arithmetic and every statistic is fp32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cmath>
#include <tuple>

namespace repblend_fast {
namespace {

constexpr int kWbce = 0;
constexpr int kInfonce = 1;
constexpr int kCwcl = 2;
constexpr int kBce = 3;
constexpr int kMse = 4;
constexpr int kKl = 5;
// The loss ids and the two eps constants below are LOSS_IDS, MASS_EPS and NORM_EPS of
// repblend_fast/reference/contrastive.py (the one definition); tests/test_contrastive.py parses
// this file and checks that they agree.
static_assert(kWbce == 0 && kInfonce == 1 && kCwcl == 2 && kBce == 3 && kMse == 4 && kKl == 5,
              "loss ids are LOSS_IDS of repblend_fast/reference/contrastive.py");
constexpr float kMassEps = 1e-6f;  // WBCE class-weight / CWCL mass regulariser (MASS_EPS)
constexpr float kNormEps = 1e-12f;  // F.normalize clamp (NORM_EPS)
constexpr int kThreads = 256;
constexpr int kTile = 16;
// Row-parallel grid (used when the caller passes row_parallel: large B, few problems; the rule is
// row_parallel() in repblend_fast/ops/contrastive.py). Softmax losses: a block owns kLines lines
// (rows, or columns for the column statistics) and kParts threads share each line; elementwise
// losses and dL/dZ: a block owns kRowsPerBlock rows. Every block writes partial sums that one more
// launch combines in a fixed order (no atomics: bit-identical from run to run).
constexpr int kLines = 32;
constexpr int kParts = 8;
constexpr int kRowsPerBlock = 8;

__device__ __forceinline__ bool is_softmax(int loss) {
  return loss == kInfonce || loss == kCwcl || loss == kKl;
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the block; every thread gets the result. `sh` holds 32 floats.
__device__ float block_sum(float v, float* sh) {
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  v = warp_sum(v);
  __syncthreads();  // sh may still be read by a previous call
  if (lane == 0) sh[wid] = v;
  __syncthreads();
  const int nw = (blockDim.x + 31) >> 5;
  v = (static_cast<int>(threadIdx.x) < nw) ? sh[threadIdx.x] : 0.f;
  if (wid == 0) v = warp_sum(v);
  if (threadIdx.x == 0) sh[0] = v;
  __syncthreads();
  return sh[0];
}

// torch's formula 1 / (1 + exp(-z)), flushing to 0 where exp(-z) overflows fp32: BCE takes logs of
// these rounded probabilities, so the kernels must round like the reference. No fminf clamp: fminf
// drops a NaN, and sigmoid(NaN) must be NaN (the branch already keeps expf from overflowing).
__device__ __forceinline__ float sigmoid_f(float z) {
  const float t = -z;
  return t > 88.72283f ? 0.f : 1.f / (1.f + expf(t));
}

// min(z, 0) as a select: fminf would turn a NaN into 0.
__device__ __forceinline__ float logsigmoid_f(float z) {
  return (z > 0.f ? 0.f : z) - log1pf(expf(-fabsf(z)));
}

// F.binary_cross_entropy semantics: logs of the rounded probabilities, clamped at -100.
__device__ __forceinline__ void bce_logs(float p, float& q, float& logp, float& logq) {
  q = 1.f - p;
  logp = fmaxf(p > 0.f ? logf(p) : -100.f, -100.f);
  logq = fmaxf(q > 0.f ? logf(q) : -100.f, -100.f);
}

__device__ float elem_loss(int loss, float z, float s, float eps) {
  const float p = sigmoid_f(z);
  if (loss == kWbce) {
    if (eps > 0.f) return -s * logf(p + eps) - (1.f - s) * logf(1.f - p + eps);
    return -s * logsigmoid_f(z) - (1.f - s) * logsigmoid_f(-z);
  }
  if (loss == kBce) {
    float q, logp, logq;
    bce_logs(p, q, logp, logq);
    return -(s * logp + (1.f - s) * logq);
  }
  return (p - s) * (p - s);  // kMse
}

// (d ell / dz, d ell / ds) of the elementwise losses, unweighted.
__device__ void elem_grads(int loss, float z, float s, float eps, float& dz, float& ds) {
  const float p = sigmoid_f(z);
  if (loss == kWbce) {
    if (eps > 0.f) {
      dz = p * (1.f - p) * (-s / (p + eps) + (1.f - s) / (1.f - p + eps));
      ds = -logf(p + eps) + logf(1.f - p + eps);
    } else {
      dz = p - s;
      ds = -z;
    }
  } else if (loss == kBce) {
    float q, logp, logq;
    bce_logs(p, q, logp, logq);
    const bool mp = p > 0.f && logf(p) >= -100.f;
    const bool mq = q > 0.f && logf(q) >= -100.f;
    dz = -s * (mp ? 1.f - p : 0.f) + (1.f - s) * (mq ? p : 0.f);
    // The masks zero a NaN probability's terms; the reference's sigmoid backward still multiplies
    // by p (1 - p) = NaN there.
    if (p != p) dz = p;
    ds = logq - logp;
  } else {  // kMse
    dz = 2.f * (p - s) * p * (1.f - p);
    ds = -2.f * (p - s);
  }
}

// ------------------------------------------------------------------------------------------------
// forward

// grid (B, K, 2): z = 0 image rows, z = 1 text rows.
template <typename T>
__global__ void norm_kernel(const T* __restrict__ img, const T* __restrict__ txt,
                            float* __restrict__ n_img, float* __restrict__ n_txt, int64_t B,
                            int64_t D) {
  __shared__ float sh[32];
  const int64_t row = static_cast<int64_t>(blockIdx.y) * B + blockIdx.x;
  const T* x = (blockIdx.z ? txt : img) + row * D;
  float acc = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    const float v = static_cast<float>(x[d]);
    acc += v * v;
  }
  acc = block_sum(acc, sh);
  if (threadIdx.x == 0) (blockIdx.z ? n_txt : n_img)[row] = sqrtf(acc);
}

// grid (ceil(B/16), ceil(B/16), K), block (16, 16): cos[k, row, col].
template <typename T>
__global__ void cos_kernel(const T* __restrict__ img, const T* __restrict__ txt,
                           const float* __restrict__ n_img, const float* __restrict__ n_txt,
                           float* __restrict__ cos, int64_t B, int64_t D) {
  __shared__ float as[kTile][kTile + 1];
  __shared__ float bs[kTile][kTile + 1];
  const int64_t k = blockIdx.z;
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t row = static_cast<int64_t>(blockIdx.y) * kTile + ty;   // image row of this output
  const int64_t col = static_cast<int64_t>(blockIdx.x) * kTile + tx;   // text row of this output
  const int64_t trow = static_cast<int64_t>(blockIdx.x) * kTile + ty;  // text row this thread loads
  const T* a = img + k * B * D;
  const T* b = txt + k * B * D;
  float acc = 0.f;
  for (int64_t d0 = 0; d0 < D; d0 += kTile) {
    const int64_t d = d0 + tx;
    as[ty][tx] = (row < B && d < D) ? static_cast<float>(a[row * D + d]) : 0.f;
    bs[ty][tx] = (trow < B && d < D) ? static_cast<float>(b[trow * D + d]) : 0.f;
    __syncthreads();
#pragma unroll
    for (int t = 0; t < kTile; ++t) acc += as[ty][t] * bs[tx][t];
    __syncthreads();
  }
  if (row < B && col < B) {
    const float ra = 1.f / fmaxf(n_img[k * B + row], kNormEps);
    const float rb = 1.f / fmaxf(n_txt[k * B + col], kNormEps);
    cos[(k * B + row) * B + col] = acc * ra * rb;
  }
}

// grid (K), block kThreads: loss[k] and the statistics.
template <typename T>
__global__ void loss_kernel(const float* __restrict__ cos, const T* __restrict__ tgt,
                            const float* __restrict__ scale, float* __restrict__ out,
                            float* __restrict__ rst, float* __restrict__ cst,
                            float* __restrict__ cnt, int64_t B, int loss, float eps) {
  __shared__ float sh[32];
  const int64_t k = blockIdx.x;
  const float s = scale[k];
  const float* c = cos + k * B * B;
  const T* t = tgt + k * B * B;
  float* rs = rst + k * 4 * B;
  float* cs = cst + k * 4 * B;
  const float bf = static_cast<float>(B);
  if (is_softmax(loss)) {
    float part = 0.f;
    for (int dir = 0; dir < 2; ++dir) {
      float* st = dir ? cs : rs;
      const int64_t sr = dir ? 1 : B;
      const int64_t sc = dir ? B : 1;
      for (int64_t j = threadIdx.x; j < B; j += blockDim.x) {
        float m = -INFINITY;
        float ms = -INFINITY;
        for (int64_t l = 0; l < B; ++l) {
          m = fmaxf(m, s * c[j * sr + l * sc]);
          if (loss == kKl) ms = fmaxf(ms, 10.f * static_cast<float>(t[j * sr + l * sc]));
        }
        float lz = 0.f, ssum = 0.f, ls = 0.f;
        for (int64_t l = 0; l < B; ++l) {
          const float z = s * c[j * sr + l * sc];
          const float x = static_cast<float>(t[j * sr + l * sc]);
          lz += expf(z - m);
          ssum += x;
          if (loss == kKl) ls += expf(10.f * x - ms);
        }
        const float lse = m + logf(lz);
        const float lse_s = loss == kKl ? ms + logf(ls) : 0.f;
        // A third sweep sums the reference's own elementwise terms: S (Z - lse) (InfoNCE/CWCL),
        // p (log p - log q) with p = softmax(10 S) (KL). The one-pass rewrites
        // (sum S Z - lse sum S, E_p[10 S - Z] - lse(10 S) + lse) turn an infinite target into
        // inf - inf = NaN where the reference gives the infinity, and cancel catastrophically for
        // large targets.
        float a = 0.f;
        for (int64_t l = 0; l < B; ++l) {
          const float logq = s * c[j * sr + l * sc] - lse;
          const float x = static_cast<float>(t[j * sr + l * sc]);
          if (loss == kKl) {
            const float logp = 10.f * x - lse_s;
            a += expf(logp) * (logp - logq);
          } else {
            a += x * logq;
          }
        }
        const float contrib = loss == kCwcl ? a / (ssum + kMassEps) : a;
        st[j] = lse;
        st[B + j] = ssum;
        st[2 * B + j] = a;
        st[3 * B + j] = lse_s;
        part += contrib;
      }
    }
    const float tot = block_sum(part, sh);
    if (threadIdx.x == 0) {
      out[k] = loss == kKl ? 0.5f * tot / (bf * bf) : -0.5f * tot / bf;
      cnt[2 * k] = 0.f;
      cnt[2 * k + 1] = 0.f;
    }
  } else {
    float sp = 0.f, sn = 0.f, np = 0.f, nn = 0.f;
    for (int64_t i = threadIdx.x; i < B * B; i += blockDim.x) {
      const float z = s * c[i];
      const float x = static_cast<float>(t[i]);
      const float ell = elem_loss(loss, z, x, eps);
      // Class masks as the reference builds them: pos = S > 0.5, neg = 1 - pos (a NaN target is
      // negative). WBCE multiplies by the masks like the reference, so a NaN or infinite loss
      // element poisons both class sums (inf * 0 = NaN) as it does there; BCE/MSE sum every
      // element once.
      const float pos = x > 0.5f ? 1.f : 0.f;
      if (loss == kWbce) {
        sp += ell * pos;
        sn += ell * (1.f - pos);
      } else {
        sp += ell;
      }
      np += pos;
      nn += 1.f - pos;
    }
    for (int64_t i = threadIdx.x; i < 4 * B; i += blockDim.x) {
      rs[i] = 0.f;
      cs[i] = 0.f;
    }
    sp = block_sum(sp, sh);
    sn = block_sum(sn, sh);
    np = block_sum(np, sh);
    nn = block_sum(nn, sh);
    if (threadIdx.x == 0) {
      out[k] = loss == kWbce ? 0.5f * (sp / (np + kMassEps) + sn / (nn + kMassEps))
                             : (sp + sn) / (bf * bf);
      cnt[2 * k] = np;
      cnt[2 * k + 1] = nn;
    }
  }
}

// Online log-sum-exp state (max, sum of exp(x - max)) merged with one more value or state. A part
// that has seen nothing holds (-inf, 0) and contributes nothing; NaN values keep the sum NaN (fmaxf
// drops a NaN from the max, expf(NaN - m) does not), as in the serial kernel.
__device__ __forceinline__ void lse_push(float& m, float& l, float x) {
  const float mn = fmaxf(m, x);
  l = (m == mn ? l : l * expf(m - mn)) + expf(x - mn);
  m = mn;
}
__device__ __forceinline__ void lse_merge(float& m, float& l, float m2, float l2) {
  if (l2 == 0.f && m2 == -INFINITY) return;
  const float mn = fmaxf(m, m2);
  l = (m == mn ? l : l * expf(m - mn)) + (m2 == mn ? l2 : l2 * expf(m2 - mn));
  m = mn;
}

// Row-parallel softmax statistics. grid (ceil(B / kLines), K, 2), block (kLines, kParts): block
// (b, k, dir) owns lines b * kLines + threadIdx.x of direction dir (0: rows, 1: columns); thread
// (x, y) of it takes elements y, y + kParts, ... of every kLines-wide tile of its line. Tiles are
// staged through shared memory so that global reads are coalesced in both directions. Two sweeps
// (the lse's, then the reference's own elementwise terms, as in loss_kernel), the kParts partial
// states of a line merged in a fixed order; writes the line statistics and the block's partial
// loss sum to part[k, dir, b].
template <typename T>
__global__ void __launch_bounds__(kLines* kParts)
    line_stats_kernel(const float* __restrict__ cos, const T* __restrict__ tgt,
                      const float* __restrict__ scale, float* __restrict__ rst,
                      float* __restrict__ cst, float* __restrict__ part, int64_t B, int64_t nb,
                      int loss) {
  __shared__ float zt[kLines][kLines + 1];  // [line][element] of the current tile
  __shared__ float st[kLines][kLines + 1];
  __shared__ float r0[kParts][kLines];  // per-part states, merged by threadIdx.y == 0
  __shared__ float r1[kParts][kLines];
  __shared__ float r2[kParts][kLines];
  __shared__ float r3[kParts][kLines];
  __shared__ float r4[kParts][kLines];
  __shared__ float line_lse[kLines];
  __shared__ float line_lss[kLines];
  __shared__ float contrib[kLines];
  const int tx = threadIdx.x;
  const int ty = threadIdx.y;
  const int64_t k = blockIdx.y;
  const int dir = blockIdx.z;
  const int64_t base = static_cast<int64_t>(blockIdx.x) * kLines;
  const int64_t line = base + tx;
  const bool kl = loss == kKl;
  const float s = scale[k];
  const float* c = cos + k * B * B;
  const T* t = tgt + k * B * B;
  float* stats = (dir ? cst : rst) + k * 4 * B;

  // Stage tile [base, base + kLines) x [l0, l0 + kLines) as zt[line][element], coalesced.
  auto stage = [&](int64_t l0) {
    for (int i = ty; i < kLines; i += kParts) {
      const int64_t ln = dir ? base + tx : base + i;
      const int64_t el = dir ? l0 + i : l0 + tx;
      const int64_t idx = dir ? el * B + ln : ln * B + el;
      const bool ok = ln < B && el < B;
      const float z = ok ? s * c[idx] : 0.f;
      const float x = ok ? static_cast<float>(t[idx]) : 0.f;
      if (dir) {
        zt[tx][i] = z;
        st[tx][i] = x;
      } else {
        zt[i][tx] = z;
        st[i][tx] = x;
      }
    }
  };

  float m = -INFINITY, lz = 0.f, ssum = 0.f, ms = -INFINITY, ls = 0.f;
  for (int64_t l0 = 0; l0 < B; l0 += kLines) {
    stage(l0);
    __syncthreads();
    if (line < B) {
      for (int j = ty; j < kLines && l0 + j < B; j += kParts) {
        const float x = st[tx][j];
        lse_push(m, lz, zt[tx][j]);
        ssum += x;
        if (kl) lse_push(ms, ls, 10.f * x);
      }
    }
    __syncthreads();
  }
  r0[ty][tx] = m;
  r1[ty][tx] = lz;
  r2[ty][tx] = ssum;
  r3[ty][tx] = ms;
  r4[ty][tx] = ls;
  __syncthreads();
  if (ty == 0) {
    for (int p = 1; p < kParts; ++p) {
      lse_merge(m, lz, r0[p][tx], r1[p][tx]);
      ssum += r2[p][tx];
      if (kl) lse_merge(ms, ls, r3[p][tx], r4[p][tx]);
    }
    line_lse[tx] = m + logf(lz);
    line_lss[tx] = kl ? ms + logf(ls) : 0.f;
    r2[0][tx] = ssum;
  }
  __syncthreads();
  const float lse = line_lse[tx];
  const float lse_s = line_lss[tx];
  // Second sweep: the reference's elementwise terms S (Z - lse) (InfoNCE/CWCL) or
  // p (log p - log q) with p = softmax(10 S) (KL), see loss_kernel.
  float a = 0.f;
  for (int64_t l0 = 0; l0 < B; l0 += kLines) {
    stage(l0);
    __syncthreads();
    if (line < B) {
      for (int j = ty; j < kLines && l0 + j < B; j += kParts) {
        const float logq = zt[tx][j] - lse;
        const float x = st[tx][j];
        if (kl) {
          const float logp = 10.f * x - lse_s;
          a += expf(logp) * (logp - logq);
        } else {
          a += x * logq;
        }
      }
    }
    __syncthreads();
  }
  r1[ty][tx] = a;
  __syncthreads();
  if (ty == 0) {
    for (int p = 1; p < kParts; ++p) a += r1[p][tx];
    float cv = 0.f;
    if (line < B) {
      const float sm = r2[0][tx];
      stats[line] = lse;
      stats[B + line] = sm;
      stats[2 * B + line] = a;
      stats[3 * B + line] = lse_s;
      cv = loss == kCwcl ? a / (sm + kMassEps) : a;
    }
    contrib[tx] = cv;
  }
  __syncthreads();
  if (tx == 0 && ty == 0) {
    float tot = 0.f;
    for (int i = 0; i < kLines; ++i) tot += contrib[i];
    part[(k * 4 + dir) * nb + blockIdx.x] = tot;
  }
}

// Row-parallel elementwise losses. grid (ceil(B / kRowsPerBlock), K), block kThreads: block (b, k)
// sums rows [b * kRowsPerBlock, ...) into part[k, 0..3, b] = (positive-class sum, negative-class
// sum, positive count, negative count) (BCE/MSE: every element in the first sum), and zeroes the
// rows' unused softmax statistics.
template <typename T>
__global__ void elem_rows_kernel(const float* __restrict__ cos, const T* __restrict__ tgt,
                                 const float* __restrict__ scale, float* __restrict__ rst,
                                 float* __restrict__ cst, float* __restrict__ part, int64_t B,
                                 int64_t nb, int loss, float eps) {
  __shared__ float sh[32];
  const int64_t k = blockIdx.y;
  const int64_t r0 = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock;
  const int64_t rows = B - r0 < kRowsPerBlock ? B - r0 : kRowsPerBlock;
  const float s = scale[k];
  const float* c = cos + k * B * B + r0 * B;
  const T* t = tgt + k * B * B + r0 * B;
  float sp = 0.f, sn = 0.f, np = 0.f, nn = 0.f;
  for (int64_t i = threadIdx.x; i < rows * B; i += blockDim.x) {
    const float z = s * c[i];
    const float x = static_cast<float>(t[i]);
    const float ell = elem_loss(loss, z, x, eps);
    // Class masks as in loss_kernel.
    const float pos = x > 0.5f ? 1.f : 0.f;
    if (loss == kWbce) {
      sp += ell * pos;
      sn += ell * (1.f - pos);
    } else {
      sp += ell;
    }
    np += pos;
    nn += 1.f - pos;
  }
  for (int64_t i = threadIdx.x; i < 4 * rows; i += blockDim.x) {
    const int64_t j = i / rows;
    const int64_t r = r0 + (i - j * rows);
    rst[k * 4 * B + j * B + r] = 0.f;
    cst[k * 4 * B + j * B + r] = 0.f;
  }
  sp = block_sum(sp, sh);
  sn = block_sum(sn, sh);
  np = block_sum(np, sh);
  nn = block_sum(nn, sh);
  if (threadIdx.x == 0) {
    float* pk = part + k * 4 * nb + blockIdx.x;
    pk[0] = sp;
    pk[nb] = sn;
    pk[2 * nb] = np;
    pk[3 * nb] = nn;
  }
}

// Fixed-order sum of n values by one warp: lane i takes i, i + 32, ..., then a butterfly.
__device__ __forceinline__ float warp_sum_strided(const float* __restrict__ v, int64_t n) {
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += 32) acc += v[i];
  return warp_sum(acc);
}

// grid (K), block 32: combines the row-parallel partials part[k, 0..3, 0..nb) into loss[k] and the
// class counts.
__global__ void loss_final_kernel(const float* __restrict__ part, float* __restrict__ out,
                                  float* __restrict__ cnt, int64_t B, int64_t nb, int loss) {
  const int64_t k = blockIdx.x;
  const float* pk = part + k * 4 * nb;
  const float bf = static_cast<float>(B);
  const float s0 = warp_sum_strided(pk, nb);
  const float s1 = warp_sum_strided(pk + nb, nb);
  if (is_softmax(loss)) {
    if (threadIdx.x == 0) {
      out[k] = loss == kKl ? 0.5f * (s0 + s1) / (bf * bf) : -0.5f * (s0 + s1) / bf;
      cnt[2 * k] = 0.f;
      cnt[2 * k + 1] = 0.f;
    }
    return;
  }
  const float np = warp_sum_strided(pk + 2 * nb, nb);
  const float nn = warp_sum_strided(pk + 3 * nb, nb);
  if (threadIdx.x == 0) {
    out[k] = loss == kWbce ? 0.5f * (s0 / (np + kMassEps) + s1 / (nn + kMassEps))
                           : (s0 + s1) / (bf * bf);
    cnt[2 * k] = np;
    cnt[2 * k + 1] = nn;
  }
}

// ------------------------------------------------------------------------------------------------
// backward

// grid (ceil(B / rows), K), block kThreads: block (b, k) writes rows [b * rows, ...) of
// dcos = g s dL/dZ and dtarget = g dL/dS. One block per problem (rows = B) writes
// dscale = g sum(dL/dZ cos) itself; with several (the row-parallel grid) each writes its partial
// sum to part[k, b] and dscale_final_kernel combines them.
template <typename T>
__global__ void dz_kernel(const float* __restrict__ gout, const float* __restrict__ cos,
                          const T* __restrict__ tgt, const float* __restrict__ scale,
                          const float* __restrict__ rst, const float* __restrict__ cst,
                          const float* __restrict__ cnt, float* __restrict__ dcos,
                          T* __restrict__ dtgt, float* __restrict__ dscale,
                          float* __restrict__ part, int64_t B, int64_t rows, int loss, float eps) {
  __shared__ float sh[32];
  const int64_t k = blockIdx.y;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * rows * B;
  const int64_t last = (first + rows * B < B * B) ? first + rows * B : B * B;
  const float g = gout[k];
  const float s = scale[k];
  const float* c = cos + k * B * B;
  const T* t = tgt + k * B * B;
  const float* rs = rst + k * 4 * B;
  const float* cs = cst + k * 4 * B;
  const float bf = static_cast<float>(B);
  const float w_p = 0.5f / (cnt[2 * k] + kMassEps);
  const float w_n = 0.5f / (cnt[2 * k + 1] + kMassEps);
  float acc = 0.f;
  for (int64_t i = first + threadIdx.x; i < last; i += blockDim.x) {
    const int64_t j = i / B;
    const int64_t l = i - j * B;
    const float cv = c[i];
    const float z = s * cv;
    const float x = static_cast<float>(t[i]);
    float dz, dsv;
    if (is_softmax(loss)) {
      const float r_lse = rs[j], r_sum = rs[B + j], r_a = rs[2 * B + j], r_lss = rs[3 * B + j];
      const float c_lse = cs[l], c_sum = cs[B + l], c_a = cs[2 * B + l], c_lss = cs[3 * B + l];
      const float p_r = expf(z - r_lse);
      const float p_c = expf(z - c_lse);
      if (loss == kKl) {
        const float f = 0.5f / (bf * bf);
        const float t_r = expf(10.f * x - r_lss);
        const float t_c = expf(10.f * x - c_lss);
        dz = f * ((p_r - t_r) + (p_c - t_c));
        const float a_r = (10.f * x - r_lss) - (z - r_lse) - r_a;
        const float a_c = (10.f * x - c_lss) - (z - c_lse) - c_a;
        dsv = f * 10.f * (t_r * a_r + t_c * a_c);
      } else if (loss == kCwcl) {
        const float f = -0.5f / bf;
        const float w_r = 1.f / (r_sum + kMassEps);
        const float w_c = 1.f / (c_sum + kMassEps);
        dz = f * (w_r * (x - r_sum * p_r) + w_c * (x - c_sum * p_c));
        dsv = f * (w_r * ((z - r_lse) - r_a * w_r) + w_c * ((z - c_lse) - c_a * w_c));
      } else {
        const float f = -0.5f / bf;
        dz = f * ((x - r_sum * p_r) + (x - c_sum * p_c));
        dsv = f * ((z - r_lse) + (z - c_lse));
      }
    } else {
      elem_grads(loss, z, x, eps, dz, dsv);
      const float w = loss == kWbce ? (x > 0.5f ? w_p : w_n) : 1.f / (bf * bf);
      dz *= w;
      dsv *= w;
    }
    acc += dz * cv;
    dcos[k * B * B + i] = g * s * dz;
    dtgt[k * B * B + i] = static_cast<T>(g * dsv);
  }
  const float tot = block_sum(acc, sh);
  if (threadIdx.x == 0) {
    if (gridDim.x == 1) {
      dscale[k] = g * tot;
    } else {
      part[k * gridDim.x + blockIdx.x] = tot;
    }
  }
}

// grid (K), block 32: dscale[k] = g[k] * (fixed-order sum of part[k, 0..nb)).
__global__ void dscale_final_kernel(const float* __restrict__ gout, const float* __restrict__ part,
                                    float* __restrict__ dscale, int64_t nb) {
  const int64_t k = blockIdx.x;
  const float tot = warp_sum_strided(part + k * nb, nb);
  if (threadIdx.x == 0) dscale[k] = gout[k] * tot;
}

// grid (B, K, 2), block kThreads, dynamic shared memory B floats. z = 0: d_img rows (dcos read
// row-wise, the other side is txt); z = 1: d_txt rows (dcos read column-wise, other side img).
template <typename T>
__global__ void dx_kernel(const float* __restrict__ dcos, const float* __restrict__ cos,
                          const T* __restrict__ img, const T* __restrict__ txt,
                          const float* __restrict__ n_img, const float* __restrict__ n_txt,
                          T* __restrict__ d_img, T* __restrict__ d_txt, int64_t B, int64_t D) {
  extern __shared__ float coef[];  // dcos[j, l] / max(|y_l|, eps)
  __shared__ float sh[32];
  const int64_t j = blockIdx.x;
  const int64_t k = blockIdx.y;
  const bool side = blockIdx.z != 0;
  const T* x = (side ? txt : img) + k * B * D;
  const T* y = (side ? img : txt) + k * B * D;
  const float* nx = (side ? n_txt : n_img) + k * B;
  const float* ny = (side ? n_img : n_txt) + k * B;
  T* dx = (side ? d_txt : d_img) + k * B * D;
  const int64_t sr = side ? 1 : B;
  const int64_t sc = side ? B : 1;
  const float* dc = dcos + k * B * B;
  const float* cc = cos + k * B * B;
  float proj = 0.f;
  for (int64_t l = threadIdx.x; l < B; l += blockDim.x) {
    const float v = dc[j * sr + l * sc];
    proj += v * cc[j * sr + l * sc];
    coef[l] = v / fmaxf(ny[l], kNormEps);
  }
  proj = block_sum(proj, sh);  // also orders the coef writes before the reads below
  const float nxj = nx[j];
  const float rx = 1.f / fmaxf(nxj, kNormEps);
  if (!(nxj >= kNormEps)) proj = 0.f;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.f;
    for (int64_t l = 0; l < B; ++l) acc += coef[l] * static_cast<float>(y[l * D + d]);
    const float u = static_cast<float>(x[j * D + d]) * rx;
    dx[j * D + d] = static_cast<T>(rx * (acc - u * proj));
  }
}

// ------------------------------------------------------------------------------------------------
// host side: validation (TORCH_CHECK) and launches

void check_inputs(const char* op, const at::Tensor& img, const at::Tensor& txt,
                  const at::Tensor& target, const at::Tensor& scale, int64_t loss, double eps) {
  TORCH_CHECK(img.is_cuda(), op, ": img must be a CUDA tensor, got ", img.device());
  TORCH_CHECK(txt.device() == img.device() && target.device() == img.device() &&
                  scale.device() == img.device(),
              op, ": img, txt, target and scale must be on one device (img is on ", img.device(),
              ")");
  TORCH_CHECK(img.dim() == 3, op, ": img must be [K, B, D], got ", img.sizes());
  TORCH_CHECK(txt.sizes() == img.sizes(), op, ": txt must have img's shape ", img.sizes(),
              ", got ", txt.sizes());
  const int64_t K = img.size(0), B = img.size(1), D = img.size(2);
  TORCH_CHECK(K >= 1 && K <= 65535, op, ": K (problems per call) must be in [1, 65535], got ", K);
  TORCH_CHECK(B > 0 && D > 0, op, ": B and D must be positive, got B=", B, " D=", D);
  TORCH_CHECK(target.dim() == 3 && target.size(0) == K && target.size(1) == B &&
                  target.size(2) == B,
              op, ": target must be [K, B, B] = [", K, ", ", B, ", ", B, "], got ",
              target.sizes());
  const auto dt = img.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": img must be float32, float16 or bfloat16, got ", dt);
  TORCH_CHECK(txt.scalar_type() == dt && target.scalar_type() == dt, op,
              ": img, txt and target must share one dtype, got ", dt, ", ", txt.scalar_type(),
              ", ", target.scalar_type());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == K && scale.scalar_type() == at::kFloat, op,
              ": scale must be float32 [K] = [", K, "], got ", scale.scalar_type(), " ",
              scale.sizes());
  TORCH_CHECK(loss >= kWbce && loss <= kKl, op, ": loss id must be in [0, 5], got ", loss);
  TORCH_CHECK(eps >= 0.0 && std::isfinite(eps), op, ": eps must be finite and >= 0, got ", eps);
}

void check_f32(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef shape,
               const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " must be on ", like.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              t.scalar_type());
  TORCH_CHECK(t.sizes() == shape, op, ": ", name, " must have shape ", shape, ", got ",
              t.sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
contrastive_fwd_cuda(const at::Tensor& img_in, const at::Tensor& txt_in,
                     const at::Tensor& target_in, const at::Tensor& scale_in, int64_t loss,
                     double eps, bool row_parallel) {
  const char* op = "repblend_fast::contrastive_fwd";
  check_inputs(op, img_in, txt_in, target_in, scale_in, loss, eps);
  const c10::cuda::CUDAGuard guard(img_in.device());
  const auto img = img_in.contiguous();
  const auto txt = txt_in.contiguous();
  const auto target = target_in.contiguous();
  const auto scale = scale_in.contiguous();
  const int64_t K = img.size(0), B = img.size(1), D = img.size(2);
  const auto f32 = img.options().dtype(at::kFloat);
  auto out = at::empty({K}, f32);
  auto cos = at::empty({K, B, B}, f32);
  auto n_img = at::empty({K, B}, f32);
  auto n_txt = at::empty({K, B}, f32);
  auto rst = at::empty({K, 4, B}, f32);
  auto cst = at::empty({K, 4, B}, f32);
  auto cnt = at::empty({K, 2}, f32);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 tiles((B + kTile - 1) / kTile, (B + kTile - 1) / kTile, K);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "contrastive_fwd",
                                  [&] {
    norm_kernel<scalar_t><<<dim3(B, K, 2), kThreads, 0, stream>>>(
        img.data_ptr<scalar_t>(), txt.data_ptr<scalar_t>(), n_img.data_ptr<float>(),
        n_txt.data_ptr<float>(), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    cos_kernel<scalar_t><<<tiles, dim3(kTile, kTile), 0, stream>>>(
        img.data_ptr<scalar_t>(), txt.data_ptr<scalar_t>(), n_img.data_ptr<float>(),
        n_txt.data_ptr<float>(), cos.data_ptr<float>(), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (!row_parallel) {
      loss_kernel<scalar_t><<<K, kThreads, 0, stream>>>(
          cos.data_ptr<float>(), target.data_ptr<scalar_t>(), scale.data_ptr<float>(),
          out.data_ptr<float>(), rst.data_ptr<float>(), cst.data_ptr<float>(),
          cnt.data_ptr<float>(), B, static_cast<int>(loss), static_cast<float>(eps));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      return;
    }
    const bool softmax = loss == kInfonce || loss == kCwcl || loss == kKl;
    const int64_t per = softmax ? kLines : kRowsPerBlock;
    const int64_t nb = (B + per - 1) / per;
    // Every partial slot the combine reads is written by exactly one block.
    auto part = at::empty({K, 4, nb}, f32);
    if (softmax) {
      line_stats_kernel<scalar_t><<<dim3(nb, K, 2), dim3(kLines, kParts), 0, stream>>>(
          cos.data_ptr<float>(), target.data_ptr<scalar_t>(), scale.data_ptr<float>(),
          rst.data_ptr<float>(), cst.data_ptr<float>(), part.data_ptr<float>(), B, nb,
          static_cast<int>(loss));
    } else {
      elem_rows_kernel<scalar_t><<<dim3(nb, K), kThreads, 0, stream>>>(
          cos.data_ptr<float>(), target.data_ptr<scalar_t>(), scale.data_ptr<float>(),
          rst.data_ptr<float>(), cst.data_ptr<float>(), part.data_ptr<float>(), B, nb,
          static_cast<int>(loss), static_cast<float>(eps));
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    loss_final_kernel<<<K, 32, 0, stream>>>(part.data_ptr<float>(), out.data_ptr<float>(),
                                            cnt.data_ptr<float>(), B, nb,
                                            static_cast<int>(loss));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, cos, n_img, n_txt, rst, cst, cnt};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> contrastive_bwd_cuda(
    const at::Tensor& grad_in, const at::Tensor& img_in, const at::Tensor& txt_in,
    const at::Tensor& target_in, const at::Tensor& scale_in, const at::Tensor& cos_in,
    const at::Tensor& n_img_in, const at::Tensor& n_txt_in, const at::Tensor& rst_in,
    const at::Tensor& cst_in, const at::Tensor& cnt_in, int64_t loss, double eps,
    bool row_parallel) {
  const char* op = "repblend_fast::contrastive_bwd";
  check_inputs(op, img_in, txt_in, target_in, scale_in, loss, eps);
  const int64_t K = img_in.size(0), B = img_in.size(1), D = img_in.size(2);
  check_f32(op, "grad", grad_in, {K}, img_in);
  check_f32(op, "cos", cos_in, {K, B, B}, img_in);
  check_f32(op, "n_img", n_img_in, {K, B}, img_in);
  check_f32(op, "n_txt", n_txt_in, {K, B}, img_in);
  check_f32(op, "row_stats", rst_in, {K, 4, B}, img_in);
  check_f32(op, "col_stats", cst_in, {K, 4, B}, img_in);
  check_f32(op, "counts", cnt_in, {K, 2}, img_in);
  const c10::cuda::CUDAGuard guard(img_in.device());
  const auto img = img_in.contiguous();
  const auto txt = txt_in.contiguous();
  const auto target = target_in.contiguous();
  const auto scale = scale_in.contiguous();
  const auto grad = grad_in.contiguous();
  const auto cos = cos_in.contiguous();
  const auto n_img = n_img_in.contiguous();
  const auto n_txt = n_txt_in.contiguous();
  const auto rst = rst_in.contiguous();
  const auto cst = cst_in.contiguous();
  const auto cnt = cnt_in.contiguous();
  const auto f32 = img.options().dtype(at::kFloat);
  auto dcos = at::empty({K, B, B}, f32);
  auto dscale = at::empty({K}, f32);
  auto d_img = at::empty_like(img);
  auto d_txt = at::empty_like(txt);
  auto d_tgt = at::empty_like(target);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const size_t smem = static_cast<size_t>(B) * sizeof(float);
  TORCH_CHECK(smem <= 48 * 1024, op, ": B=", B, " exceeds the dx kernel's shared memory (max ",
              48 * 1024 / sizeof(float), " rows); use impl='triton' or 'reference'");
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, img.scalar_type(), "contrastive_bwd",
                                  [&] {
    const int64_t rows = row_parallel ? kRowsPerBlock : B;
    const int64_t nb = (B + rows - 1) / rows;
    auto part = at::empty({row_parallel ? K * nb : 1}, f32);
    dz_kernel<scalar_t><<<dim3(nb, K), kThreads, 0, stream>>>(
        grad.data_ptr<float>(), cos.data_ptr<float>(), target.data_ptr<scalar_t>(),
        scale.data_ptr<float>(), rst.data_ptr<float>(), cst.data_ptr<float>(),
        cnt.data_ptr<float>(), dcos.data_ptr<float>(), d_tgt.data_ptr<scalar_t>(),
        dscale.data_ptr<float>(), part.data_ptr<float>(), B, rows, static_cast<int>(loss),
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (nb > 1) {
      dscale_final_kernel<<<K, 32, 0, stream>>>(grad.data_ptr<float>(), part.data_ptr<float>(),
                                                dscale.data_ptr<float>(), nb);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    dx_kernel<scalar_t><<<dim3(B, K, 2), kThreads, smem, stream>>>(
        dcos.data_ptr<float>(), cos.data_ptr<float>(), img.data_ptr<scalar_t>(),
        txt.data_ptr<scalar_t>(), n_img.data_ptr<float>(), n_txt.data_ptr<float>(),
        d_img.data_ptr<scalar_t>(), d_txt.data_ptr<scalar_t>(), B, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_img, d_txt, d_tgt, dscale};
}

}  // namespace
}  // namespace repblend_fast

TORCH_LIBRARY_FRAGMENT(repblend_fast, m) {
  m.def(
      "contrastive_fwd(Tensor img, Tensor txt, Tensor target, Tensor scale, int loss, float eps, "
      "bool row_parallel) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "contrastive_bwd(Tensor grad, Tensor img, Tensor txt, Tensor target, Tensor scale, "
      "Tensor cos, Tensor n_img, Tensor n_txt, Tensor row_stats, Tensor col_stats, "
      "Tensor counts, int loss, float eps, bool row_parallel) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(repblend_fast, CUDA, m) {
  m.impl("contrastive_fwd", &repblend_fast::contrastive_fwd_cuda);
  m.impl("contrastive_bwd", &repblend_fast::contrastive_bwd_cuda);
}
