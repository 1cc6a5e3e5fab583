// shardopt's one multi-tensor-apply layer for CUDA.
//
// Every fused elementwise optimizer step goes through multi_tensor_apply<Op>():
// the layer validates the tensor lists, groups the tensors by dtype, cuts them
// into (tensor, chunk) blocks, packs the pointer/size/chunk tables into kernel
// arguments and launches one generic kernel that loads every element as fp32,
// calls the functor and stores the results back in each tensor's own dtype.
// An algorithm contributes only a functor (see fused_optim.cu):
//
//   struct MyOp {
//     static constexpr int kDepth = 3;                   // tensor lists
//     static constexpr unsigned kWrites = 0b101;         // lists written back
//     static constexpr unsigned kDTypes[kDepth] = {...}; // allowed dtypes per list
//     static constexpr int kSameDTypeAs[kDepth] = {...}; // -1, or a list it must match
//     static constexpr const char* kNames[kDepth] = {...};
//     __device__ void operator()(float (&x)[kDepth]) const;  // one element, in place
//     // from mta::OpBase (no-ops there), for functors that need them:
//     __device__ bool begin_block();             // before the block's first element: read device
//                                                // scalars; false skips the block (nothing written)
//     __device__ void end_block(int64_t block);  // after its last element, in every thread: a
//                                                // reduction writes the block's partial result
//   };
//
// `block` numbers the blocks of one multi_tensor_apply call 0, 1, ... in launch
// order, over all its launches and dtype groups (one block per (tensor, chunk)),
// so a reduction can write its partials to a table sized from the chunk counts.
//
// Sizes and offsets are int64 everywhere (a chunk's start is stored as an
// int64 element offset, never recomputed from a 32-bit index), so a single
// tensor may hold more than 2^31 elements.
//
// Loads and stores are 16-byte vectors when every pointer of the block is
// 16-byte aligned, with a scalar tail for the last chunk's remainder; a
// misaligned tensor (e.g. a view starting at an odd element) runs the scalar
// loop.  Both paths call the same functor on the same fp32 values, so they give
// identical bits.  The functors use explicitly rounded intrinsics (__fmul_rn,
// __fadd_rn, __fdiv_rn, __fsqrt_rn, ...) which the compiler never contracts
// into FMAs, and the extension is built with -fmad=false as a second guard.
// Do not build it with --use_fast_math or -ftz=true: flushing subnormals to
// zero would break agreement with torch.
//
// The chunk planner (for_each_launch) is plain host C++ with no CUDA or ATen
// dependency; shardopt/kernels/cuda.py::chunk_plan mirrors it line for line so
// the plan can be unit-tested on CPU, and the extension exposes it
// (_chunk_plan) so a GPU test can check that both agree.  Define
// SHARDOPT_MTA_PLANNER_ONLY before including this file to get only the planner.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

namespace shardopt {
namespace mta {

// ------------------------------------------------------------ launch limits

// Elements per block.  A multiple of every vector width (8), so a chunk start
// never breaks the alignment of an aligned tensor.
constexpr int64_t kChunkSize = 65536;
// Threads per block.
constexpr int kBlockThreads = 512;
// Blocks per launch: the block table has one row per block.
constexpr int kMaxBlocks = 256;
// Bytes of kernel arguments the tables may use.  Kernel arguments are limited
// to 4 KiB on every architecture we target; the rest is left for the functor
// and the vectorize flag.
constexpr int64_t kMetaBytes = 3840;

// Tensors per launch for a functor over `depth` lists: what is left of
// kMetaBytes after the block table (8-byte start + 1-byte slot per block),
// at one pointer per list plus one int64 size per tensor.
constexpr int max_tensors_for_depth(int depth) {
  return static_cast<int>((kMetaBytes - kMaxBlocks * 9) / (8 * (depth + 1)));
}

// ------------------------------------------------------------------ planner

struct PlanBlock {
  int32_t slot;   // index into the launch's tensor table
  int64_t start;  // first element of the chunk within its tensor
};

// Calls emit(tensors, blocks) once per kernel launch, in launch order.
// `tensors` holds indices into `numels` (the launch's tensor table, slot order);
// each block covers elements [start, min(start + chunk, numel)) of
// tensors[slot].  Empty tensors get no block.  A tensor whose chunks do not
// fit in one launch continues in the next one at slot 0.
// shardopt/kernels/cuda.py::chunk_plan is the Python mirror of this function:
// change both together.
template <typename Emit>
void for_each_launch(const std::vector<int64_t>& numels, int64_t chunk, int max_tensors,
                     int max_blocks, Emit&& emit) {
  std::vector<int64_t> tensors;
  std::vector<PlanBlock> blocks;
  tensors.reserve(static_cast<size_t>(max_tensors));
  blocks.reserve(static_cast<size_t>(max_blocks));
  auto flush = [&]() {
    if (!blocks.empty()) emit(tensors, blocks);
    tensors.clear();
    blocks.clear();
  };
  for (size_t t = 0; t < numels.size(); ++t) {
    const int64_t n = numels[t];
    if (n <= 0) continue;
    const int64_t nchunks = (n - 1) / chunk + 1;  // no overflow for any n > 0
    for (int64_t c = 0; c < nchunks; ++c) {
      if (static_cast<int>(blocks.size()) == max_blocks) flush();
      if (tensors.empty() || tensors.back() != static_cast<int64_t>(t)) {
        if (static_cast<int>(tensors.size()) == max_tensors) flush();
        tensors.push_back(static_cast<int64_t>(t));
      }
      blocks.push_back(PlanBlock{static_cast<int32_t>(tensors.size() - 1), c * chunk});
    }
  }
  flush();
}

}  // namespace mta
}  // namespace shardopt

#ifndef SHARDOPT_MTA_PLANNER_ONLY

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_fp16.h>

#include <array>
#include <sstream>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace shardopt {
namespace mta {

// ------------------------------------------------------------ element types

// Storage types as the kernels see them (bit containers; all math is fp32).
struct bf16_t {
  uint16_t bits;
};
struct f16_t {
  uint16_t bits;
};

// Dtype bits for a functor's kDTypes.
constexpr unsigned kF32 = 1u;
constexpr unsigned kBF16 = 2u;
constexpr unsigned kF16 = 4u;

__device__ __forceinline__ float to_f32(float v) { return v; }
// bf16 and fp16 widen exactly.
__device__ __forceinline__ float to_f32(bf16_t v) {
  return __uint_as_float(static_cast<uint32_t>(v.bits) << 16);
}
__device__ __forceinline__ float to_f32(f16_t v) { return __half2float(__ushort_as_half(v.bits)); }

template <typename T>
__device__ __forceinline__ T from_f32(float v);
template <>
__device__ __forceinline__ float from_f32<float>(float v) {
  return v;
}
// Round to nearest even, NaN -> canonical quiet NaN 0x7FC0: the same bits as
// torch's CPU conversion and the cpu/triton backends (the hardware cvt.rn
// agrees except for the NaN payload).
template <>
__device__ __forceinline__ bf16_t from_f32<bf16_t>(float v) {
  const uint32_t u = __float_as_uint(v);
  const uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return bf16_t{static_cast<uint16_t>(v != v ? 0x7FC0u : r)};
}
template <>
__device__ __forceinline__ f16_t from_f32<f16_t>(float v) {
  return f16_t{__half_as_ushort(__float2half_rn(v))};
}

template <typename... Ts>
struct TypeList {};

template <size_t I, typename... Ts>
using TypeAt = std::tuple_element_t<I, std::tuple<Ts...>>;

template <typename... Ts>
__host__ __device__ constexpr size_t min_sizeof() {
  size_t m = 16;
  for (size_t s : {sizeof(Ts)...}) m = s < m ? s : m;
  return m;
}

// Elements per vector step: one 16-byte access for the narrowest type, whole
// 16-byte accesses for the wider ones (e.g. fp32 params with bf16 grads: 8
// elements = two 16-byte fp32 loads and one 16-byte bf16 load).
template <typename... Ts>
constexpr int kVecWidth = static_cast<int>(16 / min_sizeof<Ts...>());

// ---------------------------------------------------------------- functors

// Default per-block hooks (see the top of this file).  Every functor derives from it.
struct OpBase {
  __device__ __forceinline__ bool begin_block() { return true; }
  __device__ __forceinline__ void end_block(int64_t) {}
};

// Sum of `v` over the threads of a block, valid in thread 0.  fp32 in a fixed
// order (shuffles within each warp, then the warps' sums), so a run gives the
// same bits every time.  Every thread of the block must call it.
__device__ __forceinline__ float block_sum(float v) {
  static_assert(kBlockThreads % 32 == 0 && kBlockThreads / 32 <= 32, "one warp sums the warps' sums");
  __shared__ float warp_sums[kBlockThreads / 32];
  const int lane = static_cast<int>(threadIdx.x) & 31;
  const int warp = static_cast<int>(threadIdx.x) >> 5;
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, o));
  if (lane == 0) warp_sums[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < kBlockThreads / 32 ? warp_sums[lane] : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = __fadd_rn(v, __shfl_down_sync(0xffffffffu, v, o));
  }
  __syncthreads();  // warp_sums is free for the next call
  return v;
}

// ------------------------------------------------------------- kernel args

template <int N>
struct Meta {
  static constexpr int kMaxTensors = max_tensors_for_depth(N);
  void* addr[N][kMaxTensors];
  int64_t numel[kMaxTensors];
  int64_t block_start[kMaxBlocks];
  uint8_t block_slot[kMaxBlocks];
  static_assert(kMaxTensors >= 1 && kMaxTensors <= 256, "block_slot holds a slot in 8 bits");
};

// ------------------------------------------------------------------- kernel

template <typename T, int W>
__device__ __forceinline__ void load_vec(float (&dst)[W], const char* base, int64_t i) {
  constexpr int kWords = static_cast<int>(W * sizeof(T) / 16);
  static_assert(W * sizeof(T) % 16 == 0, "vector must be whole 16-byte words");
  union {
    uint4 u[kWords];
    T e[W];
  } buf;
  const uint4* src = reinterpret_cast<const uint4*>(base + i * static_cast<int64_t>(sizeof(T)));
#pragma unroll
  for (int j = 0; j < kWords; ++j) buf.u[j] = src[j];
#pragma unroll
  for (int w = 0; w < W; ++w) dst[w] = to_f32(buf.e[w]);
}

template <bool kWrite, typename T, int W>
__device__ __forceinline__ void store_vec(const float (&src)[W], char* base, int64_t i) {
  if constexpr (kWrite) {
    constexpr int kWords = static_cast<int>(W * sizeof(T) / 16);
    union {
      uint4 u[kWords];
      T e[W];
    } buf;
#pragma unroll
    for (int w = 0; w < W; ++w) buf.e[w] = from_f32<T>(src[w]);
    uint4* dst = reinterpret_cast<uint4*>(base + i * static_cast<int64_t>(sizeof(T)));
#pragma unroll
    for (int j = 0; j < kWords; ++j) dst[j] = buf.u[j];
  }
}

template <typename T>
__device__ __forceinline__ float load_one(const char* base, int64_t i) {
  return to_f32(reinterpret_cast<const T*>(base)[i]);
}

template <bool kWrite, typename T>
__device__ __forceinline__ void store_one(float v, char* base, int64_t i) {
  if constexpr (kWrite) reinterpret_cast<T*>(base)[i] = from_f32<T>(v);
}

// Vector body over the first n / W * W elements of the chunk; returns how many
// elements it covered.
template <typename Op, typename... Ts, size_t... K>
__device__ __forceinline__ int64_t chunk_vector(Op& op, char* const (&ptr)[sizeof...(Ts)],
                                                int64_t n, std::index_sequence<K...>) {
  constexpr int N = sizeof...(Ts);
  constexpr int W = kVecWidth<Ts...>;
  const int64_t nvec = n / W;
  for (int64_t v = threadIdx.x; v < nvec; v += kBlockThreads) {
    const int64_t i = v * W;
    float x[N][W];
    (load_vec<Ts, W>(x[K], ptr[K], i), ...);
#pragma unroll
    for (int w = 0; w < W; ++w) {
      float e[N] = {x[K][w]...};
      op(e);
      ((x[K][w] = e[K]), ...);
    }
    (store_vec<((Op::kWrites >> K) & 1u) != 0, Ts, W>(x[K], ptr[K], i), ...);
  }
  return nvec * W;
}

template <typename Op, typename... Ts, size_t... K>
__device__ __forceinline__ void chunk_scalar(Op& op, char* const (&ptr)[sizeof...(Ts)],
                                             int64_t begin, int64_t n, std::index_sequence<K...>) {
  constexpr int N = sizeof...(Ts);
  for (int64_t i = begin + threadIdx.x; i < n; i += kBlockThreads) {
    float e[N] = {load_one<Ts>(ptr[K], i)...};
    op(e);
    (store_one<((Op::kWrites >> K) & 1u) != 0, Ts>(e[K], ptr[K], i), ...);
  }
}

template <typename Op, typename... Ts, size_t... K>
__device__ __forceinline__ void run_block(const Meta<sizeof...(Ts)>& meta, Op& op,
                                          bool vectorize, std::index_sequence<K...> seq) {
  const int slot = meta.block_slot[blockIdx.x];
  const int64_t start = meta.block_start[blockIdx.x];
  const int64_t left = meta.numel[slot] - start;
  const int64_t n = left < kChunkSize ? left : kChunkSize;
  char* const ptr[sizeof...(Ts)] = {static_cast<char*>(meta.addr[K][slot]) +
                                    start * static_cast<int64_t>(sizeof(Ts))...};
  const bool aligned = vectorize && ((reinterpret_cast<uintptr_t>(ptr[K]) % 16 == 0) && ...);
  int64_t done = 0;
  if (aligned) done = chunk_vector<Op, Ts...>(op, ptr, n, seq);
  chunk_scalar<Op, Ts...>(op, ptr, done, n, seq);
}

// One block per (tensor, chunk) row of the table; `first_block` numbers this
// launch's first block within the call.
template <typename Op, typename... Ts>
__global__ void __launch_bounds__(kBlockThreads)
    mta_kernel(const Meta<sizeof...(Ts)> meta, const Op op, const bool vectorize,
               const int64_t first_block) {
  Op local = op;  // a thread's own copy: begin_block and reductions keep state in it
  if (!local.begin_block()) return;  // the same answer in every thread of the block
  run_block<Op, Ts...>(meta, local, vectorize, std::make_index_sequence<sizeof...(Ts)>{});
  local.end_block(first_block + static_cast<int64_t>(blockIdx.x));
}

// -------------------------------------------------------------- host side

using TensorList = std::vector<at::Tensor>;

inline const char* dtype_names(unsigned mask) {
  switch (mask) {
    case kF32: return "float32";
    case kF32 | kBF16: return "float32 or bfloat16";
    case kF32 | kBF16 | kF16: return "float32, bfloat16 or float16";
    default: return "a supported floating dtype";
  }
}

inline unsigned dtype_bit(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kF32;
    case at::kBFloat16: return kBF16;
    case at::kHalf: return kF16;
    default: return 0u;
  }
}

inline std::string describe(const at::Tensor& t) {
  std::ostringstream os;
  os << t.sizes() << " (" << t.scalar_type() << ")";
  return os.str();
}

// Checks every tensor of the call before any is touched; errors name the list
// and index.
template <typename Op>
c10::Device validate(const char* fn, const std::array<const TensorList*, Op::kDepth>& lists) {
  constexpr int N = Op::kDepth;
  const size_t n = lists[0]->size();
  for (int k = 1; k < N; ++k) {
    TORCH_CHECK(lists[k]->size() == n, fn, ": tensor lists must have equal lengths, got ",
                Op::kNames[0], "=", n, " but ", Op::kNames[k], "=", lists[k]->size());
  }
  TORCH_CHECK(n > 0 && (*lists[0])[0].defined(), fn, ": ", Op::kNames[0],
              "[0] is missing or undefined");
  const c10::Device device = (*lists[0])[0].device();
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& ref = (*lists[0])[i];
    for (int k = 0; k < N; ++k) {
      const char* name = Op::kNames[k];
      const at::Tensor& t = (*lists[k])[i];
      TORCH_CHECK(t.defined(), fn, ": ", name, "[", i, "] is undefined (None)");
      TORCH_CHECK(t.is_cuda(), fn, ": ", name, "[", i, "] is on ", t.device(),
                  "; backend='cuda' needs CUDA tensors");
      TORCH_CHECK(t.device() == device, fn, ": ", name, "[", i, "] is on ", t.device(), " but ",
                  Op::kNames[0], "[0] is on ", device,
                  "; all tensors of one call must be on the same device");
      TORCH_CHECK(t.layout() == at::kStrided && t.has_storage(), fn, ": ", name, "[", i,
                  "] is not a dense tensor with storage (a DTensor? pass its local shard, "
                  ".to_local())");
      TORCH_CHECK(t.numel() == ref.numel(), fn, ": ", name, "[", i, "] has shape ", describe(t),
                  " with ", t.numel(), " elements but ", Op::kNames[0], "[", i, "] has shape ",
                  describe(ref), " with ", ref.numel(), " elements");
      TORCH_CHECK(t.is_contiguous(), fn, ": ", name, "[", i, "] with shape ", describe(t),
                  " and strides ", t.strides(), " must be contiguous (call .contiguous())");
      TORCH_CHECK((dtype_bit(t.scalar_type()) & Op::kDTypes[k]) != 0, fn, ": ", name, "[", i,
                  "] has dtype ", t.scalar_type(), "; expected ", dtype_names(Op::kDTypes[k]));
      const int tie = Op::kSameDTypeAs[k];
      if (tie >= 0) {
        TORCH_CHECK(t.scalar_type() == (*lists[tie])[i].scalar_type(), fn, ": ", name, "[", i,
                    "] has dtype ", t.scalar_type(), " but ", Op::kNames[tie], "[", i, "] has ",
                    (*lists[tie])[i].scalar_type(), "; they must match");
      }
    }
  }
  return device;
}

// Calls f(TypeList<storage types...>{}) for the dtypes in `st`, instantiating
// only the combinations the functor allows.
template <typename Op, typename F, typename... Chosen>
void dispatch_dtypes(const std::array<at::ScalarType, Op::kDepth>& st, const F& f,
                     TypeList<Chosen...>) {
  constexpr int K = static_cast<int>(sizeof...(Chosen));
  if constexpr (K == Op::kDepth) {
    f(TypeList<Chosen...>{});
  } else if constexpr (Op::kSameDTypeAs[K] >= 0) {
    using Tied = TypeAt<static_cast<size_t>(Op::kSameDTypeAs[K]), Chosen...>;
    dispatch_dtypes<Op>(st, f, TypeList<Chosen..., Tied>{});
  } else {
    switch (st[K]) {
      case at::kFloat:
        if constexpr ((Op::kDTypes[K] & kF32) != 0) {
          dispatch_dtypes<Op>(st, f, TypeList<Chosen..., float>{});
          return;
        }
        break;
      case at::kBFloat16:
        if constexpr ((Op::kDTypes[K] & kBF16) != 0) {
          dispatch_dtypes<Op>(st, f, TypeList<Chosen..., bf16_t>{});
          return;
        }
        break;
      case at::kHalf:
        if constexpr ((Op::kDTypes[K] & kF16) != 0) {
          dispatch_dtypes<Op>(st, f, TypeList<Chosen..., f16_t>{});
          return;
        }
        break;
      default:
        break;
    }
    TORCH_CHECK(false, "shardopt multi_tensor_apply: unsupported dtype ", st[K], " for ",
                Op::kNames[K], " (validation should have caught this)");
  }
}

// Launches the kernel over the tensors `idx` (all of one dtype combination).
template <typename Op, typename... Ts>
void launch_group(TypeList<Ts...>, const std::array<const TensorList*, Op::kDepth>& lists,
                  const std::vector<int64_t>& idx, const Op& op, bool vectorize,
                  cudaStream_t stream, int64_t& next_block) {
  constexpr int N = Op::kDepth;
  static_assert(sizeof...(Ts) == N, "one storage type per list");
  using M = Meta<N>;
  static_assert(sizeof(M) + sizeof(Op) + 2 * sizeof(int64_t) <= 4096 - 32,
                "kernel arguments exceed the 4 KiB limit");
  std::vector<int64_t> numels(idx.size());
  for (size_t j = 0; j < idx.size(); ++j) numels[j] = (*lists[0])[static_cast<size_t>(idx[j])].numel();
  M meta;
  for_each_launch(numels, kChunkSize, M::kMaxTensors, kMaxBlocks,
                  [&](const std::vector<int64_t>& tensors, const std::vector<PlanBlock>& blocks) {
                    for (size_t s = 0; s < tensors.size(); ++s) {
                      const size_t t = static_cast<size_t>(idx[static_cast<size_t>(tensors[s])]);
                      for (int k = 0; k < N; ++k) meta.addr[k][s] = (*lists[k])[t].data_ptr();
                      meta.numel[s] = numels[static_cast<size_t>(tensors[s])];
                    }
                    for (size_t b = 0; b < blocks.size(); ++b) {
                      meta.block_slot[b] = static_cast<uint8_t>(blocks[b].slot);
                      meta.block_start[b] = blocks[b].start;
                    }
                    mta_kernel<Op, Ts...><<<static_cast<unsigned>(blocks.size()), kBlockThreads,
                                            0, stream>>>(meta, op, vectorize, next_block);
                    C10_CUDA_KERNEL_LAUNCH_CHECK();
                    next_block += static_cast<int64_t>(blocks.size());
                  });
}

// The entry point: validate, group by dtypes (first-seen order), launch each
// group on the current stream of the tensors' device, bump the version
// counters of the lists written in place (as an in-place ATen op would).
// `vectorize = false` forces the scalar path (for tests).  Returns the number
// of blocks launched: one per (tensor, chunk), numbered as end_block sees them.
template <typename Op>
int64_t multi_tensor_apply(const char* fn, const std::array<const TensorList*, Op::kDepth>& lists,
                           const Op& op, bool vectorize = true) {
  constexpr int N = Op::kDepth;
  if (lists[0]->empty()) {
    for (int k = 1; k < N; ++k)
      TORCH_CHECK(lists[k]->empty(), fn, ": tensor lists must have equal lengths, got ",
                  Op::kNames[0], "=0 but ", Op::kNames[k], "=", lists[k]->size());
    return 0;
  }
  const c10::Device device = validate<Op>(fn, lists);
  using Key = std::array<at::ScalarType, N>;
  std::vector<std::pair<Key, std::vector<int64_t>>> groups;
  const size_t n = lists[0]->size();
  for (size_t i = 0; i < n; ++i) {
    if ((*lists[0])[i].numel() == 0) continue;
    Key key;
    for (int k = 0; k < N; ++k) key[k] = (*lists[k])[i].scalar_type();
    auto it = groups.begin();
    while (it != groups.end() && it->first != key) ++it;
    if (it == groups.end()) {
      groups.emplace_back(key, std::vector<int64_t>{});
      it = groups.end() - 1;
    }
    it->second.push_back(static_cast<int64_t>(i));
  }
  for (int k = 0; k < N; ++k) {
    if ((Op::kWrites >> k) & 1u)
      for (const auto& t : *lists[k]) t.unsafeGetTensorImpl()->bump_version();
  }
  if (groups.empty()) return 0;
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device.index()).stream();
  int64_t next_block = 0;
  for (const auto& g : groups) {
    dispatch_dtypes<Op>(
        g.first,
        [&](auto types) {
          launch_group<Op>(types, lists, g.second, op, vectorize, stream, next_block);
        },
        TypeList<>{});
  }
  return next_block;
}

}  // namespace mta
}  // namespace shardopt

#endif  // SHARDOPT_MTA_PLANNER_ONLY
