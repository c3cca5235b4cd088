// The block cache behind the CPU kernels' outputs (see cpu_block_cache.h for why).
#include "cpu_block_cache.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty_strided.h>
#include <c10/core/Allocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <unordered_map>
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__unix__)
#include <pthread.h>
#endif

namespace sn_kernels {
namespace {

constexpr size_t kMinBytes = size_t(64) << 10;  // below this malloc reuses its heap anyway
constexpr size_t kPage = size_t(4) << 10;       // sizes are rounded up to whole pages: one class per weight
constexpr size_t kHuge = size_t(2) << 20;

struct Block {
  void* data;
  size_t bytes;
  uint64_t released = 0;  // when it last went idle (the cache's tick): the oldest idle block goes first
};

class BlockCache final : public c10::Allocator {
 public:
  BlockCache() {
    const char* env = std::getenv("SN_KERNELS_CPU_CACHE_MB");
    limit_ = (env != nullptr ? static_cast<size_t>(std::strtoull(env, nullptr, 10)) : size_t(1024)) << 20;
#if defined(__unix__)
    // fork() (DataLoader workers) while another thread holds the lock would leave it locked forever in
    // the child: the forking thread takes it first and both sides release it
    pthread_atfork([] { instance().mutex_.lock(); }, [] { instance().mutex_.unlock(); },
                   [] { instance().mutex_.unlock(); });
#endif
  }

  bool enabled() const { return limit_ > 0; }

  c10::DataPtr allocate(size_t n) override {
    const size_t bytes = (std::max<size_t>(n, 1) + kPage - 1) / kPage * kPage;
    Block* block = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      in_use_ += bytes;
      auto it = idle_.find(bytes);
      if (it != idle_.end()) {  // lists in the map are never empty (evict_oldest relies on it)
        block = it->second.back();
        it->second.pop_back();
        if (it->second.empty()) idle_.erase(it);
        idle_bytes_ -= bytes;
        --idle_blocks_;
        ++hits_;
      } else {
        ++misses_;
      }
    }
    if (block == nullptr) block = fresh(bytes);
    return {block->data, block, &release, c10::Device(c10::DeviceType::CPU)};
  }

  void copy_data(void* dest, const void* src, std::size_t count) const override {
    default_copy_data(dest, src, count);
  }

  std::vector<int64_t> stats() {
    std::lock_guard<std::mutex> lock(mutex_);
    return {static_cast<int64_t>(idle_bytes_), static_cast<int64_t>(idle_blocks_), static_cast<int64_t>(in_use_),
            static_cast<int64_t>(hits_), static_cast<int64_t>(misses_)};
  }

  void clear() {
    std::unordered_map<size_t, std::vector<Block*>> idle;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      idle.swap(idle_);
      idle_bytes_ = 0;
      idle_blocks_ = 0;
    }
    for (auto& entry : idle)
      for (Block* b : entry.second) destroy(b);
  }

 private:
  static Block* fresh(size_t bytes) {
    // large blocks on 2 MiB boundaries with a transparent-huge-page hint: 512x fewer first-touch faults
    const size_t align = bytes >= 4 * kHuge ? kHuge : 64;
    void* p = nullptr;
    if (posix_memalign(&p, align, bytes) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (align == kHuge) (void)madvise(p, bytes / kHuge * kHuge, MADV_HUGEPAGE);  // a hint: errors are harmless
#endif
    return new Block{p, bytes};
  }

  static void destroy(Block* b) {
    std::free(b->data);
    delete b;
  }

  // the DataPtr deleter: keep the block for the next output of its size, up to the byte limit.  Over the
  // limit the idle blocks that went idle longest ago make room, whatever their size: sizes no live model
  // asks for any more (a deleted model's) must not keep a later model's outputs out of the cache
  static void release(void* ctx) {
    Block* b = static_cast<Block*>(ctx);
    BlockCache& cache = instance();
    std::vector<Block*> victims;
    {
      std::lock_guard<std::mutex> lock(cache.mutex_);
      cache.in_use_ -= b->bytes;
      if (b->bytes > cache.limit_) {
        victims.push_back(b);
      } else {
        while (cache.idle_bytes_ + b->bytes > cache.limit_) victims.push_back(cache.evict_oldest());
        b->released = ++cache.tick_;
        cache.idle_[b->bytes].push_back(b);
        cache.idle_bytes_ += b->bytes;
        ++cache.idle_blocks_;
      }
    }
    for (Block* v : victims) destroy(v);  // outside the lock: free() of a large block unmaps it
  }

  // Removes and returns the idle block released longest ago (the caller holds the lock; some block is
  // idle).  Each size's list is in release order, so its oldest is at the front.
  Block* evict_oldest() {
    auto oldest = idle_.end();
    for (auto it = idle_.begin(); it != idle_.end(); ++it)
      if (oldest == idle_.end() || it->second.front()->released < oldest->second.front()->released) oldest = it;
    Block* b = oldest->second.front();
    oldest->second.erase(oldest->second.begin());
    if (oldest->second.empty()) idle_.erase(oldest);
    idle_bytes_ -= b->bytes;
    --idle_blocks_;
    return b;
  }

 public:
  // never destroyed: tensors may be freed during interpreter shutdown, after static destructors ran
  static BlockCache& instance() {
    static BlockCache* cache = new BlockCache();
    return *cache;
  }

 private:
  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<Block*>> idle_;
  size_t limit_ = 0, idle_bytes_ = 0, idle_blocks_ = 0, in_use_ = 0, hits_ = 0, misses_ = 0;
  uint64_t tick_ = 0;
};

}  // namespace

at::Tensor cached_empty_cpu(at::IntArrayRef sizes, at::IntArrayRef strides, at::ScalarType dtype) {
  BlockCache& cache = BlockCache::instance();
  const size_t nbytes = at::detail::computeStorageNbytes(sizes, strides, c10::elementSize(dtype));
  if (!cache.enabled() || nbytes < kMinBytes) return at::empty_strided(sizes, strides, at::TensorOptions(dtype));
  return at::Tensor(at::detail::empty_strided_generic(sizes, strides, &cache,
                                                      c10::DispatchKeySet(c10::DispatchKey::CPU), dtype));
}

std::vector<int64_t> cpu_cache_stats() { return BlockCache::instance().stats(); }

void cpu_cache_clear() { BlockCache::instance().clear(); }

}  // namespace sn_kernels
