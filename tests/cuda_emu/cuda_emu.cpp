// The CPU emulator's scheduler and CUDA runtime stand-ins (see cuda_emu.h).
#include "cuda_emu.h"

#include <sys/mman.h>
#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <string>
#include <vector>

#if defined(__SANITIZE_ADDRESS__)
extern "C" {
void __sanitizer_start_switch_fiber(void** fake_stack_save, const void* bottom, size_t size);
void __sanitizer_finish_switch_fiber(void* fake_stack_save, const void** bottom_old, size_t* size_old);
}
#define EMU_ASAN 1
#else
#define EMU_ASAN 0
#endif

namespace cuda_emu {
namespace {

// ASan's frames are several times larger than plain ones; 256 KiB per fiber is
// mapped lazily (only touched pages cost memory).
constexpr size_t kStack = 256 * 1024;
constexpr int kWarp = 32;

struct Wait {
  enum Kind { None, Barrier, Warp } kind = None;
  const char* file = nullptr;
  int line = 0;
  Collective coll = Collective::Sync;
  unsigned mask = 0;
  uint64_t bits = 0;
  int arg = 0;
  int width = kWarp;
  uint64_t result = 0;
};

struct Thread {
  uint3 idx{};
  int linear = 0;
  enum State { Ready, Waiting, Done } state = Ready;
  Wait wait;
  ucontext_t ctx{};
  char* stack = nullptr;
};

struct Run {
  const char* kernel = nullptr;
  const char* file = nullptr;
  int line = 0;
  dim3 grid, block;
  uint3 bidx{};
  const Thunk* body = nullptr;
  std::vector<Thread> threads;
  Thread* cur = nullptr;
  ucontext_t sched{};
  const void* sched_bottom = nullptr;
  size_t sched_size = 0;
  bool reverse = false;
};

Run* g_run = nullptr;
cudaError_t g_last_error = cudaSuccess;

bool reverse_order() {
  const char* o = std::getenv("CUDA_EMU_ORDER");
  return o != nullptr && std::string(o) == "reverse";
}

std::string where() {
  char buf[512];
  if (g_run == nullptr) return "outside any kernel";
  const uint3 b = g_run->bidx;
  std::snprintf(buf, sizeof buf, "kernel %s (launched at %s:%d), block (%u, %u, %u)", g_run->kernel, g_run->file,
                g_run->line, b.x, b.y, b.z);
  return buf;
}

std::string thread_name(const Thread& t) {
  char buf[96];
  std::snprintf(buf, sizeof buf, "thread (%u, %u, %u) [warp %d lane %d]", t.idx.x, t.idx.y, t.idx.z, t.linear / kWarp,
                t.linear % kWarp);
  return buf;
}

// ------------------------------------------------------------ fiber switches
void to_scheduler(Thread& t) {
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, g_run->sched_bottom, g_run->sched_size);
  swapcontext(&t.ctx, &g_run->sched);
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
  swapcontext(&t.ctx, &g_run->sched);
#endif
}

void to_thread(Thread& t) {
  g_run->cur = &t;
#if EMU_ASAN
  void* fake = nullptr;
  __sanitizer_start_switch_fiber(&fake, t.stack, kStack);
  swapcontext(&g_run->sched, &t.ctx);
  __sanitizer_finish_switch_fiber(fake, &g_run->sched_bottom, &g_run->sched_size);
#else
  swapcontext(&g_run->sched, &t.ctx);
#endif
  g_run->cur = nullptr;
}

void fiber_main() {
  Thread& t = *g_run->cur;
#if EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &g_run->sched_bottom, &g_run->sched_size);
#endif
  (*g_run->body)();
  t.state = Thread::Done;
#if EMU_ASAN
  // this fiber's stack is done with: nullptr lets ASan drop its fake frames
  __sanitizer_start_switch_fiber(nullptr, g_run->sched_bottom, g_run->sched_size);
#endif
  // returning resumes uc_link, the scheduler
}

Thread& current(const char* file, int line) {
  if (g_run == nullptr || g_run->cur == nullptr) fail(file, line, "a device built-in was used outside a kernel");
  return *g_run->cur;
}

void block_until_released(Thread& t) {
  t.state = Thread::Waiting;
  to_scheduler(t);
}

// ------------------------------------------------------------ wait resolution
const char* coll_name(Collective c) {
  switch (c) {
    case Collective::Sync: return "__syncwarp";
    case Collective::ShflIdx: return "__shfl_sync";
    case Collective::ShflUp: return "__shfl_up_sync";
    case Collective::ShflDown: return "__shfl_down_sync";
    case Collective::ShflXor: return "__shfl_xor_sync";
    case Collective::Ballot: return "__ballot_sync";
    case Collective::Any: return "__any_sync";
    case Collective::All: return "__all_sync";
  }
  return "?";
}

bool same_site(const Wait& a, const Wait& b) { return a.line == b.line && std::strcmp(a.file, b.file) == 0; }

int shfl_source(const Wait& w, int lane) {
  const int width = w.width;
  const int seg = lane & ~(width - 1);
  switch (w.coll) {
    case Collective::ShflIdx: return seg + (w.arg & (width - 1));
    case Collective::ShflUp: return (lane - seg) < w.arg ? lane : lane - w.arg;
    case Collective::ShflDown: return (lane - seg) + w.arg >= width ? lane : lane + w.arg;
    case Collective::ShflXor: {
      const int src = lane ^ w.arg;
      return src >= seg + width ? lane : src;  // a later group returns the lane's own value
    }
    default: return lane;
  }
}

// Completes the warp collective that `lead` waits in, if every lane of its mask
// waits there too. Returns whether it completed.
bool try_warp(std::vector<Thread>& th, int warp0, int nlanes, Thread& lead) {
  const Wait& w = lead.wait;
  const int my = lead.linear - warp0;
  if (!(w.mask >> my & 1u))
    fail(w.file, w.line, "%s: mask 0x%08x does not name the calling lane %d (%s)", coll_name(w.coll), w.mask, my,
         thread_name(lead).c_str());
  if (w.coll != Collective::Sync && w.coll != Collective::Ballot && w.coll != Collective::Any &&
      w.coll != Collective::All && (w.width < 1 || w.width > kWarp || (w.width & (w.width - 1)) != 0))
    fail(w.file, w.line, "%s: width %d is not a power of two in [1, 32]", coll_name(w.coll), w.width);
  for (int l = 0; l < kWarp; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    if (l >= nlanes)
      fail(w.file, w.line,
           "%s: mask 0x%08x names lane %d, which does not exist (the block has %d threads in this warp)",
           coll_name(w.coll), w.mask, l, nlanes);
    const Thread& o = th[warp0 + l];
    if (o.state == Thread::Done)
      fail(w.file, w.line, "%s: mask 0x%08x names lane %d, which has exited (%s)", coll_name(w.coll), w.mask, l,
           thread_name(o).c_str());
    if (o.state != Thread::Waiting) return false;
    if (o.wait.kind == Wait::Barrier) return false;  // may be a deadlock; decided when nothing else moves
    if (!same_site(o.wait, w) || o.wait.mask != w.mask || o.wait.coll != w.coll)
      fail(w.file, w.line, "%s with mask 0x%08x at %s:%d: lane %d waits in %s with mask 0x%08x at %s:%d instead",
           coll_name(w.coll), w.mask, w.file, w.line, l, coll_name(o.wait.coll), o.wait.mask, o.wait.file, o.wait.line);
  }
  uint64_t ballot = 0;
  int any = 0, all = 1;
  for (int l = 0; l < kWarp; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    const bool p = th[warp0 + l].wait.bits != 0;
    ballot |= static_cast<uint64_t>(p) << l;
    any |= p;
    all &= p;
  }
  for (int l = 0; l < kWarp; ++l) {
    if (!(w.mask >> l & 1u)) continue;
    Thread& o = th[warp0 + l];
    switch (w.coll) {
      case Collective::Sync: o.wait.result = 0; break;
      case Collective::Ballot: o.wait.result = ballot; break;
      case Collective::Any: o.wait.result = static_cast<uint64_t>(any); break;
      case Collective::All: o.wait.result = static_cast<uint64_t>(all); break;
      default: {
        const int src = shfl_source(o.wait, l);
        if (!(w.mask >> src & 1u))
          fail(w.file, w.line, "%s: lane %d reads lane %d, which is not in the mask 0x%08x (undefined on a GPU)",
               coll_name(w.coll), l, src, w.mask);
        o.wait.result = th[warp0 + src].wait.bits;
      }
    }
  }
  for (int l = 0; l < kWarp; ++l)
    if (w.mask >> l & 1u) {
      th[warp0 + l].wait.kind = Wait::None;
      th[warp0 + l].state = Thread::Ready;
    }
  return true;
}

bool resolve(Run& r) {
  auto& th = r.threads;
  const int n = static_cast<int>(th.size());
  bool progress = false;
  for (int warp0 = 0; warp0 < n; warp0 += kWarp) {
    const int nlanes = std::min(kWarp, n - warp0);
    for (int l = 0; l < nlanes; ++l) {
      Thread& t = th[warp0 + l];
      if (t.state == Thread::Waiting && t.wait.kind == Wait::Warp && try_warp(th, warp0, nlanes, t)) progress = true;
    }
  }
  if (progress) return true;
  // __syncthreads: every thread that has not exited must wait at one call site.
  const Thread* first = nullptr;
  for (const Thread& t : th) {
    if (t.state != Thread::Waiting || t.wait.kind != Wait::Barrier) continue;
    if (first == nullptr) first = &t;
    if (!same_site(t.wait, first->wait))
      fail(t.wait.file, t.wait.line, "divergent __syncthreads: %s waits at %s:%d while %s waits at %s:%d",
           thread_name(t).c_str(), t.wait.file, t.wait.line, thread_name(*first).c_str(), first->wait.file,
           first->wait.line);
  }
  if (first == nullptr) return false;
  for (const Thread& t : th) {
    if (t.state == Thread::Done)
      fail(first->wait.file, first->wait.line,
           "divergent __syncthreads: %s waits at %s:%d but %s has exited without reaching it",
           thread_name(*first).c_str(), first->wait.file, first->wait.line, thread_name(t).c_str());
    if (t.state == Thread::Waiting && t.wait.kind != Wait::Barrier) return false;  // a warp wait: deadlock below
  }
  for (Thread& t : th) {
    t.wait.kind = Wait::None;
    t.state = Thread::Ready;
  }
  return true;
}

[[noreturn]] void deadlock(Run& r) {
  std::map<std::string, int> sites;
  for (const Thread& t : r.threads) {
    if (t.state != Thread::Waiting) continue;
    char buf[256];
    if (t.wait.kind == Wait::Barrier)
      std::snprintf(buf, sizeof buf, "__syncthreads at %s:%d", t.wait.file, t.wait.line);
    else
      std::snprintf(buf, sizeof buf, "%s (mask 0x%08x) at %s:%d", coll_name(t.wait.coll), t.wait.mask, t.wait.file,
                    t.wait.line);
    sites[buf]++;
  }
  std::string msg;
  for (const auto& [s, c] : sites) msg += "\n  " + std::to_string(c) + " thread(s) wait in " + s;
  const Thread* any = nullptr;
  for (const Thread& t : r.threads)
    if (t.state == Thread::Waiting) any = &t;
  fail(any ? any->wait.file : r.file, any ? any->wait.line : r.line, "deadlock: no thread can run:%s", msg.c_str());
}

void run_block(Run& r) {
  auto& th = r.threads;
  const int n = static_cast<int>(th.size());
  for (Thread& t : th) {
    t.state = Thread::Ready;
    t.wait = Wait{};
    getcontext(&t.ctx);
    t.ctx.uc_stack.ss_sp = t.stack;
    t.ctx.uc_stack.ss_size = kStack;
    t.ctx.uc_link = &r.sched;
    makecontext(&t.ctx, fiber_main, 0);
  }
  for (;;) {
    for (int k = 0; k < n; ++k) {
      Thread& t = th[r.reverse ? n - 1 - k : k];
      if (t.state == Thread::Ready) to_thread(t);
    }
    bool done = true;
    for (const Thread& t : th) done &= t.state == Thread::Done;
    if (done) return;
    if (!resolve(r)) deadlock(r);
  }
}

bool bad_config(dim3 grid, dim3 block, size_t smem) {
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  return grid.x < 1 || grid.x > 0x7fffffffu || grid.y < 1 || grid.y > 65535 || grid.z < 1 || grid.z > 65535 ||
         block.x < 1 || block.x > 1024 || block.y < 1 || block.y > 1024 || block.z < 1 || block.z > 64 ||
         threads > 1024 || smem > 48 * 1024;
}

}  // namespace

void fail(const char* file, int line, const char* fmt, ...) {
  char msg[4096];
  va_list ap;
  va_start(ap, fmt);
  std::vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  std::fprintf(stderr, "cuda_emu: error at %s:%d: %s\n  in %s\n", file, line, msg, where().c_str());
  std::fflush(stderr);
  std::abort();
}

long long max_blocks() {
  const char* v = std::getenv("CUDA_EMU_MAX_BLOCKS");
  return v != nullptr && *v != '\0' ? std::atoll(v) : (1LL << 20);
}

dim3 block_dim() { return g_run ? g_run->block : dim3(0, 0, 0); }
dim3 grid_dim() { return g_run ? g_run->grid : dim3(0, 0, 0); }
uint3 block_idx() { return g_run ? g_run->bidx : uint3{}; }
const uint3& thread_idx() { return current(__FILE__, __LINE__).idx; }

void syncthreads(const char* file, int line) {
  Thread& t = current(file, line);
  t.wait = Wait{};
  t.wait.kind = Wait::Barrier;
  t.wait.file = file;
  t.wait.line = line;
  block_until_released(t);
}

uint64_t warp_collective(const char* file, int line, Collective kind, unsigned mask, uint64_t bits, int arg,
                         int width) {
  Thread& t = current(file, line);
  t.wait = Wait{};
  t.wait.kind = Wait::Warp;
  t.wait.file = file;
  t.wait.line = line;
  t.wait.coll = kind;
  t.wait.mask = mask;
  t.wait.bits = bits;
  t.wait.arg = arg;
  t.wait.width = width;
  block_until_released(t);
  return t.wait.result;
}

void run_grid(const char* kernel, const char* file, int line, dim3 grid, dim3 block, size_t smem, cudaStream_t,
              const Thunk& body) {
  if (g_run != nullptr) fail(file, line, "a kernel launched from inside a kernel (%s)", kernel);
  if (bad_config(grid, block, smem)) {
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  Run r;
  r.kernel = kernel;
  r.file = file;
  r.line = line;
  r.grid = grid;
  r.block = block;
  r.body = &body;
  r.reverse = reverse_order();
  const int n = static_cast<int>(block.x * block.y * block.z);
  r.threads.resize(n);
  char* stacks = static_cast<char*>(
      mmap(nullptr, kStack * n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
  if (stacks == MAP_FAILED) fail(file, line, "cannot map %d fiber stacks", n);
  for (int i = 0; i < n; ++i) {
    Thread& t = r.threads[i];
    t.linear = i;
    t.idx = uint3{static_cast<unsigned>(i % block.x), static_cast<unsigned>(i / block.x % block.y),
                  static_cast<unsigned>(i / (block.x * block.y))};
    t.stack = stacks + kStack * i;
  }
  g_run = &r;
  const uint64_t nblocks = uint64_t{grid.x} * grid.y * grid.z;
  for (uint64_t k = 0; k < nblocks; ++k) {
    const uint64_t b = r.reverse ? nblocks - 1 - k : k;
    r.bidx = uint3{static_cast<unsigned>(b % grid.x), static_cast<unsigned>(b / grid.x % grid.y),
                   static_cast<unsigned>(b / (uint64_t{grid.x} * grid.y))};
    run_block(r);
  }
  g_run = nullptr;
  munmap(stacks, kStack * n);
}

}  // namespace cuda_emu

// ------------------------------------------------------ CUDA runtime stand-ins
extern "C" {

cudaError_t cudaGetLastError(void) {
  const cudaError_t e = cuda_emu::g_last_error;
  cuda_emu::g_last_error = cudaSuccess;
  return e;
}

cudaError_t cudaPeekAtLastError(void) { return cuda_emu::g_last_error; }

const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "unknown error";
  }
}

const char* cudaGetErrorName(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "cudaSuccess";
    case cudaErrorInvalidValue: return "cudaErrorInvalidValue";
    case cudaErrorInvalidConfiguration: return "cudaErrorInvalidConfiguration";
    default: return "cudaErrorUnknown";
  }
}

cudaError_t cudaMemsetAsync(void* p, int value, size_t count, cudaStream_t) {
  if (count) std::memset(p, value, count);
  return cudaSuccess;
}

cudaError_t cudaMemset(void* p, int value, size_t count) { return cudaMemsetAsync(p, value, count, nullptr); }

}  // extern "C"
