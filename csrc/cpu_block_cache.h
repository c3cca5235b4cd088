// Output tensors of the CPU kernels (W / sigma, grad_W) from a block cache.
//
// PyTorch's CPU allocator is malloc.  glibc hands a freed block of hundreds of KiB or more back
// to the kernel (munmap, or trimming the top of the heap), so the next step's output of the same
// size is fresh memory and its first write page-faults every 4 KiB page: on a 2-core machine that
// was about a third of an SNGAN discriminator's spectral-norm step.  The same weights produce
// the same output sizes every step, so a freed output block is kept for the next one (what the
// CUDA caching allocator does on the GPU).  Idle blocks are bounded in bytes
// (SN_KERNELS_CPU_CACHE_MB, default 1024; 0 disables the cache: over it the blocks idle longest
// go first) and released by `sn_kernels.native.empty_cache()`; blocks below 64 KiB go to malloc
// directly.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

namespace sn_kernels {

// An uninitialised CPU tensor with these sizes and strides whose storage comes from the cache.
at::Tensor cached_empty_cpu(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype);

// {bytes held idle, idle blocks, bytes handed out and not yet freed, cache hits, misses}
std::vector<int64_t> cpu_cache_stats();

// Frees every idle block.
void cpu_cache_clear();

}  // namespace sn_kernels
