// Python bindings of the shardopt CUDA kernels (compiled by the host compiler;
// the kernels are in fused_optim.cu).  The chunk planner is host-only code and
// is exposed as-is so tests can compare it with the Python mirror
// shardopt/kernels/cuda.py::chunk_plan.
#include <torch/extension.h>

#define SHARDOPT_MTA_PLANNER_ONLY
#include "multi_tensor_apply.cuh"

#include <optional>
#include <string>
#include <tuple>
#include <vector>

namespace shardopt {
namespace cuda_ops {

using TensorList = std::vector<at::Tensor>;

void lion_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
               double lr, double beta1, double beta2, double weight_decay, bool maximize,
               std::optional<double> clip_value, const std::optional<at::Tensor>& grad_scale,
               const std::optional<at::Tensor>& found_inf, bool vectorize);
void adamw_step(const TensorList& params, const TensorList& grads, const TensorList& exp_avgs,
                const TensorList& exp_avg_sqs, double lr, double beta1, double beta2, double eps,
                double weight_decay, int64_t step, const std::optional<TensorList>& max_exp_avg_sqs,
                bool maximize, std::optional<double> clip_value,
                const std::optional<at::Tensor>& grad_scale,
                const std::optional<at::Tensor>& found_inf, bool vectorize);
at::Tensor grad_stats(const TensorList& grads, std::optional<double> clip_value, bool vectorize);
std::string build_info();

}  // namespace cuda_ops
}  // namespace shardopt

namespace {

using Launch = std::tuple<std::vector<int64_t>, std::vector<std::tuple<int64_t, int64_t>>>;

// The launcher's plan for tensors of these sizes: per launch, the tensor
// table (indices into numels) and the (slot, start) row of every block.
std::vector<Launch> chunk_plan(const std::vector<int64_t>& numels, int64_t chunk_size,
                               int64_t max_tensors, int64_t max_blocks) {
  TORCH_CHECK(chunk_size > 0 && max_tensors > 0 && max_blocks > 0,
              "chunk_plan: chunk_size, max_tensors and max_blocks must be positive");
  std::vector<Launch> plan;
  shardopt::mta::for_each_launch(
      numels, chunk_size, static_cast<int>(max_tensors), static_cast<int>(max_blocks),
      [&](const std::vector<int64_t>& tensors, const std::vector<shardopt::mta::PlanBlock>& blocks) {
        std::vector<std::tuple<int64_t, int64_t>> rows;
        rows.reserve(blocks.size());
        for (const auto& b : blocks) rows.emplace_back(b.slot, b.start);
        plan.emplace_back(tensors, std::move(rows));
      });
  return plan;
}

// (chunk_size, max_tensors, max_blocks, block_threads, meta_bytes) of the
// launcher for a functor over `depth` tensor lists.
std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t> launch_limits(int64_t depth) {
  TORCH_CHECK(depth >= 1 && depth <= 5, "launch_limits: depth must be 1..5, got ", depth);
  namespace m = shardopt::mta;
  return {m::kChunkSize, m::max_tensors_for_depth(static_cast<int>(depth)), m::kMaxBlocks,
          m::kBlockThreads, m::kMetaBytes};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace ops = shardopt::cuda_ops;
  m.doc() = "shardopt fused multi-tensor Lion/AdamW CUDA kernels and gradient pass";
  // grad_scale / found_inf: fp32 0-d CUDA tensors the kernels read (never the host)
  m.def("lion_step", &ops::lion_step, "Fused multi-tensor Lion step (in place)", py::arg("params"),
        py::arg("grads"), py::arg("exp_avgs"), py::arg("lr"), py::arg("beta1"), py::arg("beta2"),
        py::arg("weight_decay"), py::arg("maximize") = false, py::arg("clip_value") = py::none(),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("vectorize") = true);
  m.def("adamw_step", &ops::adamw_step,
        "Fused multi-tensor AdamW step (in place); max_exp_avg_sqs given means amsgrad",
        py::arg("params"), py::arg("grads"), py::arg("exp_avgs"), py::arg("exp_avg_sqs"),
        py::arg("lr"), py::arg("beta1"), py::arg("beta2"), py::arg("eps"),
        py::arg("weight_decay"), py::arg("step"), py::arg("max_exp_avg_sqs") = py::none(),
        py::arg("maximize") = false, py::arg("clip_value") = py::none(),
        py::arg("grad_scale") = py::none(), py::arg("found_inf") = py::none(),
        py::arg("vectorize") = true);
  m.def("grad_stats", &ops::grad_stats,
        "The fused gradient pass: float64 [sum of squares of the clipped grads, 0 or NaN]",
        py::arg("grads"), py::arg("clip_value") = py::none(), py::arg("vectorize") = true);
  m.def("_chunk_plan", &chunk_plan, "The launcher's (tensor, chunk) plan; for tests",
        py::arg("numels"), py::arg("chunk_size"), py::arg("max_tensors"), py::arg("max_blocks"));
  m.def("launch_limits", &launch_limits,
        "(chunk_size, max_tensors, max_blocks, block_threads, meta_bytes) for a depth",
        py::arg("depth"));
  m.def("build_info", &ops::build_info, "Compile-time configuration of the kernels");
}
