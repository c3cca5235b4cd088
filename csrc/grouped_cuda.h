// The multi-tensor CUDA kernels of sn_kernels.group (sn_kernels_grouped_cuda.cu), called by the grouped
// ops (sn_kernels_grouped_cpu.cpp) for the CUDA weights that qualify (group_cuda_qualifies).  Compiled
// in CUDA builds only (SN_KERNELS_WITH_CUDA).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

#include "common.h"

namespace sn_kernels {

// Whether a weight can take the multi-tensor CUDA kernels: on a CUDA device, float32, float16, bfloat16
// or float64, contiguous (others take the per-weight kernels).
bool group_cuda_qualifies(const at::Tensor& weight);

// Power iteration and W / sigma of weights of one device and one dtype, every argument already checked
// (check_power_iteration_args), views[i] = matrix_view(weights[i], dims[i]).  Functional: returns
// (W / sigma, sigma, new u, new v) as new tensors, the stored u, v untouched.
std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>, std::vector<at::Tensor>>
group_forward_cuda(const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                   const std::vector<at::Tensor>& vs, const std::vector<MatrixView>& views,
                   int64_t n_power_iterations, double eps, bool vu, bool training);

// grad_W = (G - <G, W / sigma> u v^T) / sigma of weights of one device and one dtype (the arguments
// checked as backward_cuda checks them; sigma on the weight's device).
std::vector<at::Tensor> group_backward_cuda(const std::vector<at::Tensor>& grads,
                                            const std::vector<at::Tensor>& weights, const std::vector<at::Tensor>& us,
                                            const std::vector<at::Tensor>& vs, const std::vector<at::Tensor>& sigmas,
                                            const std::vector<MatrixView>& views);

}  // namespace sn_kernels
