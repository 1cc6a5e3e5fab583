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
//     with round-to-nearest-even.
#include "multi_tensor_apply.cuh"

#include <cmath>
#include <sstream>
#include <string>
#include <vector>

namespace shardopt {
namespace cuda_ops {

using mta::kBF16;
using mta::kF16;
using mta::kF32;
using mta::TensorList;

// x = {param, grad, exp_avg}
struct LionOp {
  static constexpr int kDepth = 3;
  static constexpr unsigned kWrites = 0b101u;
  static constexpr unsigned kDTypes[kDepth] = {kF32 | kBF16, kF32 | kBF16 | kF16, kF32 | kBF16};
  static constexpr int kSameDTypeAs[kDepth] = {-1, -1, -1};
  static constexpr const char* kNames[kDepth] = {"params", "grads", "exp_avgs"};

  float lr, b1, omb1, b2, omb2, wd;
  bool has_wd;

  __device__ __forceinline__ void operator()(float (&x)[kDepth]) const {
    const float p = x[0], g = x[1], m = x[2];
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

// x = {param, grad, exp_avg, exp_avg_sq}
struct AdamWOp {
  static constexpr int kDepth = 4;
  static constexpr unsigned kWrites = 0b1101u;
  static constexpr unsigned kDTypes[kDepth] = {kF32 | kBF16, kF32 | kBF16 | kF16, kF32 | kBF16,
                                               kF32 | kBF16};
  static constexpr int kSameDTypeAs[kDepth] = {-1, -1, -1, 2};
  static constexpr const char* kNames[kDepth] = {"params", "grads", "exp_avgs", "exp_avg_sqs"};

  float b1, omb1, b2, omb2, eps, decay, step_size, bc2_sqrt;
  bool has_wd;

  __device__ __forceinline__ void operator()(float (&x)[kDepth]) const {
    float p = x[0];
    const float g = x[1];
    // decoupled decay: p = p*(1 - lr*wd)
    if (has_wd) p = __fmul_rn(p, decay);
    // m = beta1*m + (1-beta1)*g ; v = beta2*v + (1-beta2)*(g*g)
    const float m = __fadd_rn(__fmul_rn(x[2], b1), __fmul_rn(g, omb1));
    const float v = __fadd_rn(__fmul_rn(x[3], b2), __fmul_rn(__fmul_rn(g, g), omb2));
    // p = p - (m / (sqrt(v)/sqrt(bc2) + eps)) * (lr/bc1)
    const float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(v), bc2_sqrt), eps);
    x[0] = __fsub_rn(p, __fmul_rn(__fdiv_rn(m, denom), step_size));
    x[2] = m;
    x[3] = v;
  }
};

void lion_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               double lr, double beta1, double beta2, double weight_decay, bool vectorize) {
  LionOp op;
  op.lr = static_cast<float>(lr);
  op.b1 = static_cast<float>(beta1);
  op.omb1 = static_cast<float>(1.0 - beta1);
  op.b2 = static_cast<float>(beta2);
  op.omb2 = static_cast<float>(1.0 - beta2);
  op.wd = static_cast<float>(weight_decay);
  op.has_wd = weight_decay != 0.0;
  mta::multi_tensor_apply<LionOp>("lion_step", {&params, &grads, &exp_avgs}, op, vectorize);
}

void adamw_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                const TensorList& exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step, bool vectorize) {
  TORCH_CHECK(step >= 1, "adamw_step: step must be >= 1 (already incremented), got ", step);
  // Same double-precision formulas as torch_ops.adamw_scalars.
  const double bc1 = 1.0 - std::pow(beta1, static_cast<double>(step));
  const double bc2 = 1.0 - std::pow(beta2, static_cast<double>(step));
  AdamWOp op;
  op.b1 = static_cast<float>(beta1);
  op.omb1 = static_cast<float>(1.0 - beta1);
  op.b2 = static_cast<float>(beta2);
  op.omb2 = static_cast<float>(1.0 - beta2);
  op.eps = static_cast<float>(eps);
  op.decay = static_cast<float>(1.0 - lr * weight_decay);
  op.step_size = static_cast<float>(lr / bc1);
  op.bc2_sqrt = static_cast<float>(std::sqrt(bc2));
  op.has_wd = weight_decay != 0.0;
  mta::multi_tensor_apply<AdamWOp>("adamw_step", {&params, &grads, &exp_avgs, &exp_avg_sqs}, op,
                                   vectorize);
}

std::string build_info() {
  std::ostringstream os;
  os << "chunk=" << mta::kChunkSize << " block_threads=" << mta::kBlockThreads
     << " max_blocks=" << mta::kMaxBlocks << " max_tensors(lion)="
     << mta::max_tensors_for_depth(LionOp::kDepth)
     << " max_tensors(adamw)=" << mta::max_tensors_for_depth(AdamWOp::kDepth)
     << " cuda=" << CUDART_VERSION;
  return os.str();
}

}  // namespace cuda_ops
}  // namespace shardopt
