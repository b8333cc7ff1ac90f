#include "thread_pool.h"

#include <dlfcn.h>
#include <link.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <condition_variable>
#include <mutex>
#include <algorithm>
#include <thread>
#include <vector>

namespace vivace {
namespace {

class ThreadPool {
 public:
  void run(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
    std::unique_lock<std::mutex> call(call_mutex_, std::try_to_lock);
    if (!call.owns_lock() || threads <= 1 || n <= 1) {
      for (int64_t i = 0; i < n; ++i) fn(i);
      return;
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      while (static_cast<int>(workers_.size()) < threads - 1) workers_.emplace_back([this] { work_loop(); });
      job_ = &fn;
      size_ = n;
      next_.store(0);
      seats_ = threads - 1;
      active_ = 0;
      open_ = true;
      ++generation_;
    }
    wake_.notify_all();
    drain();
    std::unique_lock<std::mutex> lock(mutex_);
    open_ = false;
    done_.wait(lock, [this] { return active_ == 0; });
  }

 private:
  void drain() {
    for (int64_t i = next_.fetch_add(1); i < size_; i = next_.fetch_add(1)) (*job_)(i);
  }

  void work_loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [&] { return generation_ != seen; });
      seen = generation_;
      if (!open_ || seats_ == 0) continue;
      --seats_;
      ++active_;
      lock.unlock();
      drain();
      lock.lock();
      if (--active_ == 0) done_.notify_all();
    }
  }

  std::mutex call_mutex_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(int64_t)>* job_ = nullptr;
  int64_t size_ = 0;
  std::atomic<int64_t> next_{0};
  int seats_ = 0;
  int active_ = 0;
  bool open_ = false;
  uint64_t generation_ = 0;
};

// Never destroyed: workers sleep through interpreter shutdown. A forked child gets a fresh pool, since
// the parent's workers do not exist there.
ThreadPool& pool() {
  static std::mutex guard;
  static ThreadPool* instance = nullptr;
  static pid_t owner = 0;
  std::lock_guard<std::mutex> lock(guard);
  if (!instance || owner != getpid()) {
    instance = new ThreadPool();
    owner = getpid();
  }
  return *instance;
}

// libgomp's entry for `#pragma omp parallel`: runs fn(data) on a team of num_threads, the caller included.
using OpenMpParallel = void (*)(void (*fn)(void*), void* data, unsigned num_threads, unsigned flags);

// GOMP_parallel of the OpenMP runtime already loaded in this process (torch's CPU wheels bring their own libgomp),
// looked up once, at the first parallel call; null where none is loaded.
OpenMpParallel loaded_openmp() {
  static const OpenMpParallel found = [] {
    OpenMpParallel parallel = nullptr;
    dl_iterate_phdr(
        [](dl_phdr_info* info, size_t, void* out) -> int {
          const char* name = info->dlpi_name;
          if (!name || (!std::strstr(name, "libgomp") && !std::strstr(name, "libiomp") && !std::strstr(name, "libomp")))
            return 0;
          void* library = dlopen(name, RTLD_NOW | RTLD_NOLOAD);
          if (!library) return 0;
          auto* symbol = reinterpret_cast<OpenMpParallel>(dlsym(library, "GOMP_parallel"));
          dlclose(library);  // RTLD_NOLOAD took a reference to a library that stays loaded
          *static_cast<OpenMpParallel*>(out) = symbol;
          return symbol ? 1 : 0;
        },
        &parallel);
    return parallel;
  }();
  return found;
}

struct OpenMpJob {
  const std::function<void(int64_t)>* fn;
  int64_t n;
  std::atomic<int64_t> next{0};
};

void drain_job(void* data) {
  auto& job = *static_cast<OpenMpJob*>(data);
  for (int64_t i = job.next.fetch_add(1); i < job.n; i = job.next.fetch_add(1)) (*job.fn)(i);
}

}  // namespace

// On torch's OpenMP team where torch loaded one: its workers are the ones torch's own ops just used, still spinning
// between regions, so a kernel right after a torch op starts at once, and no second set of threads competes with
// them for the cores (the pool below sleeps on a condition variable: a futex wake-up per call).
void parallel_for(int64_t n, int threads, const std::function<void(int64_t)>& fn) {
  if (threads <= 1 || n <= 1) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  if (const OpenMpParallel parallel = loaded_openmp()) {
    OpenMpJob job{&fn, n};
    parallel(&drain_job, &job, static_cast<unsigned>(std::min<int64_t>(threads, n)), 0);
    return;
  }
  pool().run(n, threads, fn);
}

bool parallel_on_openmp() { return loaded_openmp() != nullptr; }

}  // namespace vivace
