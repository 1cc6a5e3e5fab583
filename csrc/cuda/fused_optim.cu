// Fused multi-tensor Lion / AdamW steps for CUDA tensors (shardopt `cuda` backend).
//
// Only the per-element math lives here, as functors for the shared
// multi-tensor-apply layer (multi_tensor_apply.cuh), which does validation,
// dtype dispatch, chunking, vectorized loads/stores and launching.
//
// Numerics follow shardopt/kernels/torch_ops.py (the reference):
//   * every operation is fp32 in the reference's order, with explicitly
//     rounded intrinsics: __fmul_rn/__fadd_rn/__fsub_rn are never contracted
//     into FMAs, __fdiv_rn/__fsqrt_rn are IEEE correctly rounded (plain `/`
//     and sqrtf would be too without fast-math, the intrinsics say so
//     regardless of flags);
//   * host scalars are rounded to fp32 as torch does: float(beta1),
//     float(1 - beta1) with the difference taken in double, AdamW's step
//     scalars in double as torch_ops.adamw_scalars;
//   * params fp32 or bf16, grads fp32/bf16/fp16, state fp32 or bf16 (both
//     AdamW moments share a dtype): loaded exactly, updated in fp32, stored
//     with round-to-nearest-even;
//   * the gradient is read as torch_ops.effective_grads reads it: negated
//     with maximize, clamped to +-clip_value, times grad_scale.  grad_scale
//     (the clip coefficient) and found_inf (the skip flag) are fp32 0-d
//     device tensors read by the kernel, once per block, never by the host, so
//     a step does not synchronize; found_inf nonzero (or NaN) skips every
//     block, so the call writes nothing;
//   * grad_stats is the fused gradient pass: fp32 squares of the clipped
//     gradients summed in fp32 per block, g*0 summed per block (0, or NaN for
//     an inf/NaN raw gradient), the per-block partials summed in fp64 on the
//     device.
#include "multi_tensor_apply.cuh"

#include <cmath>
#include <optional>
#include <sstream>
#include <string>
#include <vector>

namespace shardopt {
namespace cuda_ops {

using mta::kBF16;
using mta::kF16;
using mta::kF32;
using mta::TensorList;

// How an update reads its gradient (torch_ops.effective_grads), and the skip flag.
struct GradIn {
  const float* scale_ptr = nullptr;  // grad_scale, or nullptr
  const float* flag_ptr = nullptr;   // found_inf, or nullptr
  float clip = 0.0f;                 // clip_value rounded to fp32, when has_clip
  float scale = 1.0f;                // *scale_ptr, read by begin()
  bool has_clip = false;
  bool maximize = false;

  __device__ __forceinline__ bool begin() {
    if (flag_ptr != nullptr && *flag_ptr != 0.0f) return false;  // nonzero or NaN: write nothing
    if (scale_ptr != nullptr) scale = *scale_ptr;
    return true;
  }

  __device__ __forceinline__ float operator()(float g) const {
    if (maximize) g = -g;
    if (has_clip) {  // clamp_min then clamp_max; comparisons let NaN through, as torch.clamp does
      g = g < -clip ? -clip : g;
      g = g > clip ? clip : g;
    }
    if (scale_ptr != nullptr) g = __fmul_rn(g, scale);
    return g;
  }
};

// x = {param, grad, exp_avg}
struct LionOp : mta::OpBase {
  static constexpr int kDepth = 3;
  static constexpr unsigned kWrites = 0b101u;
  static constexpr unsigned kDTypes[kDepth] = {kF32 | kBF16, kF32 | kBF16 | kF16, kF32 | kBF16};
  static constexpr int kSameDTypeAs[kDepth] = {-1, -1, -1};
  static constexpr const char* kNames[kDepth] = {"params", "grads", "exp_avgs"};

  GradIn gin;
  float lr, b1, omb1, b2, omb2, wd;
  bool has_wd;

  __device__ __forceinline__ bool begin_block() { return gin.begin(); }

  __device__ __forceinline__ void operator()(float (&x)[kDepth]) const {
    const float p = x[0], g = gin(x[1]), m = x[2];
    // c = beta1*m + (1-beta1)*g
    const float c = __fadd_rn(__fmul_rn(m, b1), __fmul_rn(g, omb1));
    // torch.sign: (c > 0) - (c < 0), so sign(+-0) = sign(nan) = 0
    float u = __fsub_rn(c > 0.0f ? 1.0f : 0.0f, c < 0.0f ? 1.0f : 0.0f);
    // p = p - lr*(sign(c) + wd*p); the decay reads p before the step
    if (has_wd) u = __fadd_rn(u, __fmul_rn(p, wd));
    x[0] = __fsub_rn(p, __fmul_rn(u, lr));
    // m = beta2*m + (1-beta2)*g
    x[2] = __fadd_rn(__fmul_rn(m, b2), __fmul_rn(g, omb2));
  }
};

// x = {param, grad, exp_avg, exp_avg_sq[, max_exp_avg_sq]}
template <bool kAmsgrad>
struct AdamWOp : mta::OpBase {
  static constexpr int kDepth = kAmsgrad ? 5 : 4;
  static constexpr unsigned kWrites = kAmsgrad ? 0b11101u : 0b1101u;
  // (the fifth entries are read only with amsgrad)
  static constexpr unsigned kDTypes[5] = {kF32 | kBF16, kF32 | kBF16 | kF16, kF32 | kBF16,
                                          kF32 | kBF16, kF32 | kBF16};
  static constexpr int kSameDTypeAs[5] = {-1, -1, -1, 2, 2};
  static constexpr const char* kNames[5] = {"params", "grads", "exp_avgs", "exp_avg_sqs",
                                            "max_exp_avg_sqs"};

  GradIn gin;
  float b1, omb1, b2, omb2, eps, decay, step_size, bc2_sqrt;
  bool has_wd;

  __device__ __forceinline__ bool begin_block() { return gin.begin(); }

  __device__ __forceinline__ void operator()(float (&x)[kDepth]) const {
    float p = x[0];
    const float g = gin(x[1]);
    // decoupled decay: p = p*(1 - lr*wd)
    if (has_wd) p = __fmul_rn(p, decay);
    // m = beta1*m + (1-beta1)*g ; v = beta2*v + (1-beta2)*(g*g)
    const float m = __fadd_rn(__fmul_rn(x[2], b1), __fmul_rn(g, omb1));
    const float v = __fadd_rn(__fmul_rn(x[3], b2), __fmul_rn(__fmul_rn(g, g), omb2));
    float vhat = v;
    if constexpr (kAmsgrad) {
      // torch.maximum: a NaN in either operand wins
      const float vmax = x[4];
      vhat = (v > vmax || v != v) ? v : vmax;
      x[4] = vhat;
    }
    // p = p - (m / (sqrt(v)/sqrt(bc2) + eps)) * (lr/bc1)
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vhat), bc2_sqrt), eps);
    x[0] = __fsub_rn(p, __fmul_rn(__fdiv_rn(m, denom), step_size));
    x[2] = m;
    x[3] = v;
  }
};

// x = {grad}; nothing is written back.  Each thread sums its elements, each
// block its threads (fp32), and the block's two sums go to partials[block]
// and partials[nblocks + block].
struct GradStatsOp : mta::OpBase {
  static constexpr int kDepth = 1;
  static constexpr unsigned kWrites = 0u;
  static constexpr unsigned kDTypes[kDepth] = {kF32 | kBF16 | kF16};
  static constexpr int kSameDTypeAs[kDepth] = {-1};
  static constexpr const char* kNames[kDepth] = {"grads"};

  float* partials;  // [2, nblocks]: sums of squares, then bad flags
  int64_t nblocks;
  float clip;
  bool has_clip;
  float sumsq, bad;  // this thread's running sums

  __device__ __forceinline__ bool begin_block() {
    sumsq = 0.0f;
    bad = 0.0f;
    return true;
  }

  __device__ __forceinline__ void operator()(float (&x)[kDepth]) {
    float g = x[0];
    // g*0 of the raw value: 0 when finite, NaN for inf/NaN (a clamp would hide an inf)
    bad = __fadd_rn(bad, __fmul_rn(g, 0.0f));
    if (has_clip) {
      g = g < -clip ? -clip : g;
      g = g > clip ? clip : g;
    }
    sumsq = __fadd_rn(sumsq, __fmul_rn(g, g));
  }

  __device__ __forceinline__ void end_block(int64_t block) {
    const float s = mta::block_sum(sumsq);
    const float b = mta::block_sum(bad);
    if (threadIdx.x == 0) {
      partials[block] = s;
      partials[nblocks + block] = b;
    }
  }
};

namespace {

// A 0-d fp32 device tensor the kernels read (grad_scale, found_inf), or nullptr.
const float* device_scalar(const char* fn, const char* name, const std::optional<at::Tensor>& t,
                           const TensorList& params) {
  if (!t.has_value() || !t->defined()) return nullptr;
  TORCH_CHECK(t->is_cuda() && t->scalar_type() == at::kFloat && t->numel() == 1, fn, ": ", name,
              " must be a one-element float32 CUDA tensor, got shape ", t->sizes(), " (",
              t->scalar_type(), ") on ", t->device());
  TORCH_CHECK(params.empty() || t->device() == params[0].device(), fn, ": ", name, " is on ",
              t->device(), " but params[0] is on ", params[0].device());
  return t->data_ptr<float>();
}

GradIn grad_in(const char* fn, const TensorList& params, bool maximize,
               std::optional<double> clip_value, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf) {
  GradIn gin;
  gin.maximize = maximize;
  gin.has_clip = clip_value.has_value();
  gin.clip = gin.has_clip ? static_cast<float>(*clip_value) : 0.0f;
  gin.scale_ptr = device_scalar(fn, "grad_scale", grad_scale, params);
  gin.flag_ptr = device_scalar(fn, "found_inf", found_inf, params);
  return gin;
}

}  // namespace

void lion_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               double lr, double beta1, double beta2, double weight_decay, bool maximize,
               std::optional<double> clip_value, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, bool vectorize) {
  LionOp op;
  op.gin = grad_in("lion_step", params, maximize, clip_value, grad_scale, found_inf);
  op.lr = static_cast<float>(lr);
  op.b1 = static_cast<float>(beta1);
  op.omb1 = static_cast<float>(1.0 - beta1);
  op.b2 = static_cast<float>(beta2);
  op.omb2 = static_cast<float>(1.0 - beta2);
  op.wd = static_cast<float>(weight_decay);
  op.has_wd = weight_decay != 0.0;
  mta::multi_tensor_apply<LionOp>("lion_step", {&params, &grads, &exp_avgs}, op, vectorize);
}

template <bool kAmsgrad>
AdamWOp<kAmsgrad> adamw_op(const GradIn& gin, double lr, double beta1, double beta2, double eps,
                           double weight_decay, int64_t step) {
  // Same double-precision formulas as torch_ops.adamw_scalars.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamWOp<kAmsgrad> op;
  op.gin = gin;
  op.b1 = static_cast<float>(beta1);
  op.omb1 = static_cast<float>(1.0 - beta1);
  op.b2 = static_cast<float>(beta2);
  op.omb2 = static_cast<float>(1.0 - beta2);
  op.eps = static_cast<float>(eps);
  op.decay = static_cast<float>(1.0 - lr * weight_decay);
  op.step_size = static_cast<float>(lr / bc1);
  op.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  op.has_wd = weight_decay != 0.0;
  return op;
}

void adamw_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                const TensorList& exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step, const std::optional<TensorList>& max_exp_avg_sqs,
                bool maximize, std::optional<double> clip_value,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, bool vectorize) {
  TORCH_CHECK(step >= 1, "adamw_step: step must be >= 1 (already incremented), got ", step);
  const GradIn gin = grad_in("adamw_step", params, maximize, clip_value, grad_scale, found_inf);
  if (max_exp_avg_sqs.has_value()) {
    mta::multi_tensor_apply<AdamWOp<true>>(
        "adamw_step", {&params, &grads, &exp_avgs, &exp_avg_sqs, &*max_exp_avg_sqs},
        adamw_op<true>(gin, lr, beta1, beta2, eps, weight_decay, step), vectorize);
  } else {
    mta::multi_tensor_apply<AdamWOp<false>>(
        "adamw_step", {&params, &grads, &exp_avgs, &exp_avg_sqs},
        adamw_op<false>(gin, lr, beta1, beta2, eps, weight_decay, step), vectorize);
  }
}

at::Tensor grad_stats(const TensorList& grads, std::optional<double> clip_value, bool vectorize) {
  TORCH_CHECK(!grads.empty(), "grad_stats: no gradients (the caller returns zeros for an empty list)");
  // one block per (tensor, chunk): the partials table has a column for each
  int64_t nblocks = 0;
  for (const auto& g : grads)
    if (g.defined() && g.numel() > 0) nblocks += (g.numel() - 1) / mta::kChunkSize + 1;
  if (nblocks == 0) return at::zeros({2}, grads[0].options().dtype(at::kDouble));
  TORCH_CHECK(grads[0].is_cuda(), "grad_stats: grads[0] is on ", grads[0].device(),
              "; backend='cuda' needs CUDA tensors");
  at::Tensor partials = at::empty({2, nblocks}, grads[0].options().dtype(at::kFloat));
  GradStatsOp op;
  op.partials = partials.data_ptr<float>();
  op.nblocks = nblocks;
  op.has_clip = clip_value.has_value();
  op.clip = op.has_clip ? static_cast<float>(*clip_value) : 0.0f;
  op.sumsq = op.bad = 0.0f;
  const int64_t launched = mta::multi_tensor_apply<GradStatsOp>("grad_stats", {&grads}, op, vectorize);
  TORCH_CHECK(launched == nblocks, "grad_stats: launched ", launched, " blocks for ", nblocks,
              " chunks (internal error)");
  return partials.to(at::kDouble).sum(1);
}

std::string build_info() {
  std::ostringstream os;
  os << "chunk=" << mta::kChunkSize << " block_threads=" << mta::kBlockThreads
     << " max_blocks=" << mta::kMaxBlocks << " max_tensors(lion)="
     << mta::max_tensors_for_depth(LionOp::kDepth)
     << " max_tensors(adamw)=" << mta::max_tensors_for_depth(AdamWOp<false>::kDepth)
     << " max_tensors(adamw_amsgrad)=" << mta::max_tensors_for_depth(AdamWOp<true>::kDepth)
     << " max_tensors(grad_stats)=" << mta::max_tensors_for_depth(GradStatsOp::kDepth)
     << " cuda=" << CUDART_VERSION;
  return os.str();
}

}  // namespace cuda_ops
}  // namespace shardopt
