// tests/cuda_host/runtime.cpp: what cuda_host.h declares -- fibers, the block scheduler, the
// shared-memory race checker (the __asan_* hooks the instrumented kernel objects call) and a
// fake device. Built WITHOUT instrumentation into libcuda_host.so; see cuda_host.h.
#include <dlfcn.h>
#include <link.h>
#include <sys/mman.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "cuda_host.h"

#define PTF_EXPORT extern "C" __attribute__((visibility("default")))

struct TlsIndex {
  unsigned long module, offset;
};
extern "C" void* __tls_get_addr(TlsIndex*);  // the start of a module's TLS block in this thread

// ------------------------------------------------------------------ context switch
// ptf_switch(save, to): saves the callee-saved registers on the current stack, stores the stack
// pointer in *save and resumes the stack `to` (built by init_stack or saved by ptf_switch).
extern "C" void ptf_switch(void** save, void* to);
extern "C" void ptf_fiber_start();
#if defined(__x86_64__)
asm(R"(
  .text
  .p2align 4
  .type ptf_switch, @function
ptf_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ptf_switch, .-ptf_switch
  .type ptf_fiber_start, @function
ptf_fiber_start:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size ptf_fiber_start, .-ptf_fiber_start
)");
#else
#error "tests/cuda_host: the fiber switch is written for x86-64 only"
#endif

namespace cuda_host {
namespace {

constexpr size_t kStackBytes = 64 << 10;
constexpr uint16_t kMany = 0xffff;

enum State { kReady, kAtBarrier, kAtWarp, kAtGrid, kDone };

struct Fiber {
  void* sp = nullptr;
  ThreadCtx ctx{};
  int linear = 0;
  State state = kReady;
  int kind = 0;  // BarrierKind or WarpOp of the pending collective
  unsigned mask = 0;
  uint32_t value = 0;
  int arg = 0;
  int width = 32;
  uint32_t result = 0;
};

struct Shadow {  // per shared byte
  uint32_t w_epoch, r_epoch;
  uint16_t writer, reader;  // linear thread ids; reader kMany = several threads
};

struct Device {
  int num_sms = 4;
  int cooperative = 1;
  int blocks_per_sm = 2;
  int workers = 2;  // OS threads for the blocks of a non-cooperative launch
} g_dev;

std::mutex g_log_mu;
std::string g_last_error;  // message of the last failed launch
std::string g_launch_log;  // one line per launch since the last reset

struct LaunchState {
  LaunchSpec spec;
  unsigned n_blocks = 0, n_threads = 0;
  size_t tls_modid = 0, tls_size = 0;
  std::atomic<bool> failed{false};
  std::mutex mu;
  std::string error;
  std::atomic<unsigned> next_block{0};
  // grid barrier (cooperative launches)
  std::condition_variable cv;
  unsigned arrived = 0, generation = 0;
  bool exited = false;
};

struct Worker {  // one OS thread running blocks (a pool thread: stacks and shadow are kept)
  LaunchState* L = nullptr;
  size_t modid = 0;
  std::vector<Fiber> fibers;
  std::vector<char*> stacks;
  Fiber* cur = nullptr;
  void* sched_sp = nullptr;
  uintptr_t shared_lo = 0;
  size_t shared_size = 0;
  Shadow* shadow = nullptr;
  uint32_t epoch = 0, block_base = 0, epoch_counter = 0, barriers = 0;
  std::string uninit;  // the first read of a never-written byte in this barrier interval
  uint3 block{};
  ~Worker() {
    for (char* s : stacks) munmap(s, kStackBytes + 4096);
    free(shadow);
  }
};

__thread Worker* tl_worker __attribute__((tls_model("initial-exec")));

std::string fmt(const char* f, ...) {
  char buf[1024];
  va_list ap;
  va_start(ap, f);
  vsnprintf(buf, sizeof buf, f, ap);
  va_end(ap);
  return buf;
}

std::string kernel_name(const LaunchSpec& s) {
  std::string where = s.where ? s.where : "";
  const size_t w = where.find("[with ");
  return std::string(s.name) + (w == std::string::npos ? "" : " " + where.substr(w));
}

std::string thread_str(const Worker* w, int linear) {
  const dim3 b = w->L->spec.block;
  return fmt("(%d,%d,%d)", linear % b.x, (linear / b.x) % b.y, linear / (b.x * b.y));
}

// "racecheck: kernel decode_split_kernel<T, D, GMAX> [with T = __half; ...], block (3,0,0): "
std::string at_block(const Worker* w, const char* tool) {
  return fmt("%s: kernel %s, block (%u,%u,%u): ", tool, kernel_name(w->L->spec).c_str(), w->block.x, w->block.y,
             w->block.z);
}

void fail_launch(LaunchState* L, const std::string& what) {
  {
    std::lock_guard<std::mutex> lk(L->mu);
    if (L->error.empty()) L->error = what;
    L->failed = true;
  }
  L->cv.notify_all();
}

// Fails the launch from inside a fiber: the fiber never runs again (its stack is abandoned).
[[noreturn]] void fail_here(Worker* w, const char* tool, const std::string& what) {
  fail_launch(w->L, at_block(w, tool) + what);
  Fiber* f = w->cur;
  f->state = kDone;
  ptf_switch(&f->sp, w->sched_sp);
  __builtin_unreachable();
}

[[noreturn]] void fiber_main(Fiber* f) {
  Worker* w = tl_worker;
  w->L->spec.run(w->L->spec.closure);
  f->state = kDone;
  ptf_switch(&f->sp, w->sched_sp);
  __builtin_unreachable();
}

void init_stack(Fiber& f, char* stack) {
  uintptr_t top = reinterpret_cast<uintptr_t>(stack + 4096 + kStackBytes) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top - 8);
  *sp = reinterpret_cast<void*>(&ptf_fiber_start);  // ret target; rsp = top (16-aligned) there
  *--sp = nullptr;                                     // rbp
  *--sp = nullptr;                                     // rbx
  *--sp = &f;                                          // r12 -> rdi
  *--sp = reinterpret_cast<void*>(&fiber_main);        // r13 = entry
  *--sp = nullptr;                                     // r14
  *--sp = nullptr;                                     // r15
  f.sp = sp;
}

void yield(Worker* w) { ptf_switch(&w->cur->sp, w->sched_sp); }

// ------------------------------------------------------------------ race checker
const char* kHazard[] = {"read-after-write", "write-after-read", "write-after-write"};

[[noreturn]] void hazard(Worker* w, int kind, size_t off, size_t n, size_t byte, uint16_t other, bool write) {
  const std::string who = other == kMany ? std::string("other threads") : "thread " + thread_str(w, other);
  const std::string since = w->barriers == 0 ? std::string("since the block started")
                                             : fmt("since the block's barrier #%u", w->barriers);
  fail_here(w, "racecheck", fmt("%s hazard: thread %s %s %zu byte(s) at shared+0x%zx (address %p); byte shared+0x%zx "
                                "was %s by %s %s, with no barrier in between",
                                kHazard[kind], thread_str(w, w->cur->linear).c_str(), write ? "writes" : "reads", n, off,
                                reinterpret_cast<void*>(w->shared_lo + off), byte, kind == 1 ? "read" : "written",
                                who.c_str(), since.c_str()));
}

void check_shared(Worker* w, size_t off, size_t n, bool write) {
  const uint16_t tid = static_cast<uint16_t>(w->cur->linear);
  const uint32_t e = w->epoch;
  for (size_t i = off; i < off + n && i < w->shared_size; ++i) {
    Shadow& s = w->shadow[i];
    if (!write) {
      // Reported at the next barrier unless another thread writes the byte before it (then the
      // cause is a missing barrier, reported as write-after-read).
      if (s.w_epoch < w->block_base && w->uninit.empty()) {
        w->uninit = at_block(w, "initcheck") +
                    fmt("uninitialized read: thread %s reads %zu byte(s) at shared+0x%zx (address %p); byte "
                        "shared+0x%zx was never written by this block",
                        thread_str(w, tid).c_str(), n, off, reinterpret_cast<void*>(w->shared_lo + off), i);
      }
      if (s.w_epoch == e && s.writer != tid) hazard(w, 0, off, n, i, s.writer, false);
      if (s.r_epoch != e) {
        s.r_epoch = e;
        s.reader = tid;
      } else if (s.reader != tid) {
        s.reader = kMany;
      }
    } else {
      if (s.w_epoch == e && s.writer != tid) hazard(w, 2, off, n, i, s.writer, true);
      if (s.r_epoch == e && s.reader != tid) hazard(w, 1, off, n, i, s.reader, true);
      s.w_epoch = e;
      s.writer = tid;
    }
  }
}

inline void on_access(uintptr_t a, size_t n, bool write) {
  Worker* w = tl_worker;
  if (w == nullptr || w->cur == nullptr) return;  // host code (launchers, shims)
  const uintptr_t off = a - w->shared_lo;
  if (off < w->shared_size) check_shared(w, off, n, write);
}

// ------------------------------------------------------------------ block scheduler
const char* kWarpOpName[] = {"__shfl_sync", "__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync",
                             "__ballot_sync", "__syncwarp"};
const char* kBarName[] = {"__syncthreads", "__syncthreads_or", "__syncthreads_and", "__syncthreads_count"};

const char* where_str(const Fiber& f) {
  switch (f.state) {
    case kDone:
      return "exited";
    case kAtBarrier:
      return kBarName[f.kind];
    case kAtGrid:
      return "grid.sync()";
    case kAtWarp:
      return kWarpOpName[f.kind];
    default:
      return "running";
  }
}

// Completes the warp collectives whose lanes have all arrived; fails the launch on a broken
// mask. Returns true if some lane became ready.
bool resolve_warps(Worker* w, bool stalled) {
  bool progress = false;
  const int n = static_cast<int>(w->L->n_threads);
  for (int base = 0; base < n; base += 32) {
    Fiber* lanes[32] = {nullptr};
    for (int l = 0; l < 32 && base + l < n; ++l) lanes[l] = &w->fibers[base + l];
    for (int l = 0; l < 32; ++l) {
      Fiber* f = lanes[l];
      if (f == nullptr || f->state != kAtWarp) continue;
      const unsigned m = f->mask;
      const std::string head = at_block(w, "synccheck") + fmt("%s(mask 0x%08x) in thread %s (warp %d, lane %d)",
                                                              kWarpOpName[f->kind], m, thread_str(w, f->linear).c_str(),
                                                              base / 32, l);
      if (!(m >> l & 1)) {
        fail_launch(w->L, head + " does not name its own lane in the mask");
        return false;
      }
      bool complete = true;
      std::string missing;
      for (int j = 0; j < 32; ++j) {
        if (!(m >> j & 1)) continue;
        const Fiber* g = lanes[j];
        if (g == nullptr) {
          missing += fmt(" lane %d (no such thread)", j);
          complete = false;
        } else if (g->state != kAtWarp || g->mask != m || g->kind != f->kind) {
          if (g->state == kDone || stalled) missing += fmt(" lane %d (%s)", j, where_str(*g));
          complete = false;
        }
      }
      if (!missing.empty()) {
        fail_launch(w->L, head + ": lanes named by the mask did not arrive:" + missing);
        return false;
      }
      if (!complete) continue;
      uint32_t ballot = 0;
      for (int j = 0; j < 32; ++j) {
        if (m >> j & 1) ballot |= (lanes[j]->value != 0 ? 1u : 0u) << j;
      }
      for (int j = 0; j < 32; ++j) {
        if (!(m >> j & 1)) continue;
        Fiber* g = lanes[j];
        const int width = g->width;
        if (width < 1 || width > 32 || (width & (width - 1))) {
          fail_launch(w->L, head + fmt(": width %d is not a power of two <= 32", width));
          return false;
        }
        const int seg = j & ~(width - 1);
        int src = j;
        switch (g->kind) {
          case kShflIdx: src = seg + (g->arg & (width - 1)); break;
          case kShflXor: src = j ^ g->arg; break;
          case kShflDown: src = j + g->arg; break;
          case kShflUp: src = j - g->arg; break;
          default: break;
        }
        if (src < seg || src >= seg + width) src = j;  // out of the segment: own value
        if (g->kind <= kShflUp && !(m >> src & 1)) {
          fail_launch(w->L, head + fmt(": lane %d reads lane %d, which is not in the mask", j, src));
          return false;
        }
        g->result = g->kind == kBallot ? ballot : g->kind == kSyncWarp ? 0u : lanes[src]->value;
        g->state = kReady;
      }
      progress = true;
    }
  }
  return progress;
}

void grid_barrier(Worker* w) {
  LaunchState* L = w->L;
  std::unique_lock<std::mutex> lk(L->mu);
  if (L->exited) {
    lk.unlock();
    fail_launch(L, fmt("synccheck: kernel %s: grid.sync() in block (%u,%u,%u) after another block exited (deadlock)",
                       kernel_name(L->spec).c_str(), w->block.x, w->block.y, w->block.z));
    return;
  }
  const unsigned gen = L->generation;
  if (++L->arrived == L->n_blocks) {
    L->arrived = 0;
    ++L->generation;
    L->cv.notify_all();
    return;
  }
  L->cv.wait(lk, [&] { return L->generation != gen || L->failed; });
}

void block_exited(Worker* w) {
  LaunchState* L = w->L;
  std::unique_lock<std::mutex> lk(L->mu);
  L->exited = true;
  if (L->arrived > 0) {
    lk.unlock();
    fail_launch(L, fmt("synccheck: kernel %s: block (%u,%u,%u) exited while other blocks wait in grid.sync() (deadlock)",
                       kernel_name(L->spec).c_str(), w->block.x, w->block.y, w->block.z));
  }
}

void run_block(Worker* w, unsigned linear_block) {
  LaunchState* L = w->L;
  const dim3 g = L->spec.grid, b = L->spec.block;
  w->block = {linear_block % g.x, (linear_block / g.x) % g.y, linear_block / (g.x * g.y)};
  const unsigned n = L->n_threads;
  while (w->stacks.size() < n) {
    void* s = mmap(nullptr, kStackBytes + 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (s == MAP_FAILED) abort();
    mprotect(s, 4096, PROT_NONE);  // guard page below the stack
    w->stacks.push_back(static_cast<char*>(s));
  }
  w->fibers.assign(n, Fiber{});
  for (unsigned t = 0; t < n; ++t) {
    Fiber& f = w->fibers[t];
    f.linear = static_cast<int>(t);
    f.ctx = {{t % b.x, (t / b.x) % b.y, t / (b.x * b.y)}, w->block, b, g};
    init_stack(f, w->stacks[t]);
  }
  memset(reinterpret_cast<void*>(w->shared_lo), 0xff, w->shared_size);  // garbage, as on a GPU (NaN floats)
  w->block_base = w->epoch = ++w->epoch_counter;
  w->barriers = 0;
  w->uninit.clear();
  for (;;) {
    for (Fiber& f : w->fibers) {  // run every ready thread until it blocks or exits
      if (f.state != kReady) continue;
      w->cur = &f;
      ptf_switch(&w->sched_sp, f.sp);
      w->cur = nullptr;
      if (L->failed) return;
    }
    if (resolve_warps(w, false)) continue;
    if (L->failed) return;
    int at_bar = 0, at_grid = 0, at_warp = 0, kind = -1;
    bool mixed = false;
    for (const Fiber& f : w->fibers) {
      at_bar += f.state == kAtBarrier;
      at_grid += f.state == kAtGrid;
      at_warp += f.state == kAtWarp;
      if (f.state == kAtBarrier) {
        mixed |= kind >= 0 && kind != f.kind;
        kind = f.kind;
      }
    }
    if (!w->uninit.empty()) {
      fail_launch(L, w->uninit);
      return;
    }
    if (at_bar + at_grid + at_warp == 0) break;  // every thread exited
    if (at_warp > 0) {  // stalled collective: name the lanes that are elsewhere
      resolve_warps(w, true);
      fail_launch(L, at_block(w, "synccheck") + "deadlock in a warp collective");
      return;
    }
    if ((at_bar > 0 && at_grid > 0) || mixed) {
      std::string states;
      for (const Fiber& f : w->fibers) {
        if (&f == &w->fibers[0] || f.state != w->fibers[0].state || f.kind != w->fibers[0].kind) {
          states += fmt(" thread %s: %s;", thread_str(w, f.linear).c_str(), where_str(f));
          if (states.size() > 300) break;
        }
      }
      fail_launch(L, at_block(w, "synccheck") + "divergent barriers:" + states);
      return;
    }
    if (at_grid > 0) {
      if (!L->spec.cooperative) {
        fail_launch(L, "grid.sync() in kernel " + kernel_name(L->spec) + " launched without cooperative launch");
        return;
      }
      grid_barrier(w);
      if (L->failed) return;
    }
    // release the barrier: every thread that did not exit has arrived
    uint32_t count = 0, all = 1;
    for (const Fiber& f : w->fibers) {
      if (f.state == kAtBarrier || f.state == kAtGrid) {
        count += f.value;
        all &= f.value;
      }
    }
    for (Fiber& f : w->fibers) {
      if (f.state != kAtBarrier && f.state != kAtGrid) continue;
      f.result = f.kind == kBarOr ? count > 0 : f.kind == kBarAnd ? all : count;
      f.state = kReady;
    }
    w->epoch = ++w->epoch_counter;
    ++w->barriers;
  }
  if (L->spec.cooperative) block_exited(w);
}

void run_job(Worker& w, LaunchState* L, int fixed_block) {
  w.L = L;
  if (w.modid != L->tls_modid) {  // another kernel library: its TLS block is our shared memory
    TlsIndex ti{L->tls_modid, 0};
    w.modid = L->tls_modid;
    w.shared_lo = L->tls_size > 0 ? reinterpret_cast<uintptr_t>(__tls_get_addr(&ti)) : 0;
    w.shared_size = L->tls_size;
    free(w.shadow);
    w.shadow = static_cast<Shadow*>(calloc(L->tls_size + 1, sizeof(Shadow)));
    w.epoch_counter = 0;
  }
  tl_worker = &w;
  if (fixed_block >= 0) {
    run_block(&w, static_cast<unsigned>(fixed_block));
  } else {
    for (unsigned blk; !L->failed && (blk = L->next_block++) < L->n_blocks;) run_block(&w, blk);
  }
  tl_worker = nullptr;
}

// Pool threads live as long as the process (never joined: leaked on purpose at exit).
struct PoolThread {
  std::mutex mu;
  std::condition_variable cv;
  LaunchState* job = nullptr;
  int block = -1;
  bool done = false;
  void loop() {
    Worker w;
    for (;;) {
      std::unique_lock<std::mutex> lk(mu);
      cv.wait(lk, [&] { return job != nullptr; });
      LaunchState* L = job;
      lk.unlock();
      run_job(w, L, block);
      lk.lock();
      job = nullptr;
      done = true;
      cv.notify_all();
    }
  }
};
std::mutex g_pool_mu;  // one launch at a time
std::vector<PoolThread*> g_pool;

// Runs the launch on `count` pool threads (fixed_blocks: thread i runs block i only).
void run_on_pool(LaunchState* L, unsigned count, bool fixed_blocks) {
  while (g_pool.size() < count) {
    PoolThread* t = new PoolThread;
    std::thread(&PoolThread::loop, t).detach();
    g_pool.push_back(t);
  }
  for (unsigned i = 0; i < count; ++i) {
    std::lock_guard<std::mutex> lk(g_pool[i]->mu);
    g_pool[i]->block = fixed_blocks ? static_cast<int>(i) : -1;
    g_pool[i]->done = false;
    g_pool[i]->job = L;
    g_pool[i]->cv.notify_all();
  }
  for (unsigned i = 0; i < count; ++i) {
    std::unique_lock<std::mutex> lk(g_pool[i]->mu);
    g_pool[i]->cv.wait(lk, [&] { return g_pool[i]->done; });
  }
}

// The TLS segment (= __shared__ memory) of the module that holds `addr`.
void find_tls(const void* addr, size_t* modid, size_t* size) {
  struct Query {
    uintptr_t a;
    size_t modid, size;
  } q{reinterpret_cast<uintptr_t>(addr), 0, 0};
  dl_iterate_phdr(
      [](dl_phdr_info* info, size_t, void* data) -> int {
        Query* q = static_cast<Query*>(data);
        bool mine = false;
        size_t tls = 0;
        for (int i = 0; i < info->dlpi_phnum; ++i) {
          const auto& ph = info->dlpi_phdr[i];
          const uintptr_t lo = info->dlpi_addr + ph.p_vaddr;
          if (ph.p_type == PT_LOAD && q->a >= lo && q->a < lo + ph.p_memsz) mine = true;
          if (ph.p_type == PT_TLS) tls = ph.p_memsz;
        }
        if (!mine) return 0;
        q->modid = info->dlpi_tls_modid;
        q->size = tls;
        return 1;
      },
      &q);
  *modid = q.modid;
  *size = q.size;
}

__thread cudaError_t tl_last_error = cudaSuccess;

}  // namespace

const ThreadCtx& ctx() { return tl_worker->cur->ctx; }

int syncthreads(BarrierKind kind, int pred) {
  Worker* w = tl_worker;
  Fiber* f = w->cur;
  f->state = kAtBarrier;
  f->kind = kind;
  f->value = pred != 0;
  yield(w);
  return static_cast<int>(f->result);
}

void grid_sync() {
  Worker* w = tl_worker;
  Fiber* f = w->cur;
  f->state = kAtGrid;
  f->kind = kBarPlain;
  f->value = 0;
  yield(w);
}

uint32_t warp_collective(WarpOp op, unsigned mask, uint32_t value, int arg, int width) {
  Worker* w = tl_worker;
  Fiber* f = w->cur;
  f->state = kAtWarp;
  f->kind = op;
  f->mask = mask;
  f->value = value;
  f->arg = arg;
  f->width = width;
  yield(w);
  return f->result;
}

int atomic_add_i32(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
unsigned atomic_add_u32(unsigned* p, unsigned v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
float atomic_add_f32(float* p, float v) {
  float old, desired;
  __atomic_load(p, &old, __ATOMIC_RELAXED);
  do {
    desired = old + v;
  } while (!__atomic_compare_exchange(p, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}

int occupancy_blocks_per_sm(unsigned threads) { return threads <= 1024 ? g_dev.blocks_per_sm : 0; }

cudaError_t launch(const LaunchSpec& spec) {
  LaunchState L;
  L.spec = spec;
  const dim3 g = spec.grid, b = spec.block;
  L.n_blocks = g.x * g.y * g.z;
  L.n_threads = b.x * b.y * b.z;
  cudaError_t err = cudaSuccess;
  if (L.n_blocks == 0 || L.n_threads == 0 || L.n_threads > 1024 || b.z > 64 || g.y > 65535 || g.z > 65535) {
    err = cudaErrorInvalidConfiguration;
  } else if (spec.smem != 0) {
    err = cudaErrorInvalidValue;  // dynamic shared memory is not emulated
  } else if (spec.cooperative && !g_dev.cooperative) {
    err = cudaErrorNotSupported;
  } else if (spec.cooperative &&
             L.n_blocks > static_cast<unsigned>(occupancy_blocks_per_sm(L.n_threads) * g_dev.num_sms)) {
    err = cudaErrorCooperativeLaunchTooLarge;
  }
  {
    std::lock_guard<std::mutex> lk(g_log_mu);
    g_launch_log += fmt("%s grid=(%u,%u,%u) block=(%u,%u,%u)%s%s\n", kernel_name(spec).c_str(), g.x, g.y, g.z, b.x,
                        b.y, b.z, spec.cooperative ? " cooperative" : "", err ? " REFUSED" : "");
  }
  if (err != cudaSuccess) {
    tl_last_error = err;
    return err;
  }
  find_tls(spec.kernel_addr, &L.tls_modid, &L.tls_size);
  {
    std::lock_guard<std::mutex> lk(g_pool_mu);
    if (spec.cooperative) {  // every block live at once, one thread each
      run_on_pool(&L, L.n_blocks, true);
    } else {
      run_on_pool(&L, std::max(1u, std::min(L.n_blocks, static_cast<unsigned>(g_dev.workers))), false);
    }
  }
  if (L.failed) {
    std::lock_guard<std::mutex> lk(g_log_mu);
    g_last_error = L.error;
    tl_last_error = cudaErrorLaunchFailure;
    return cudaErrorLaunchFailure;
  }
  return cudaSuccess;
}

}  // namespace cuda_host

cudaError_t cudaGetLastError() {
  const cudaError_t e = cuda_host::tl_last_error;
  cuda_host::tl_last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError() { return cuda_host::tl_last_error; }
const char* cudaGetErrorString(cudaError_t e) {
  switch (e) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorLaunchFailure: return "unspecified launch failure";
    case cudaErrorCooperativeLaunchTooLarge: return "too many blocks in cooperative launch";
    case cudaErrorNotSupported: return "operation not supported";
  }
  return "unknown error";
}
cudaError_t cudaGetDevice(int* dev) {
  *dev = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = cuda_host::g_dev.num_sms;
  else if (attr == cudaDevAttrCooperativeLaunch) *value = cuda_host::g_dev.cooperative;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}

// ------------------------------------------------------------------ C ABI for the tests
PTF_EXPORT void cuda_host_configure(int num_sms, int cooperative, int blocks_per_sm, int workers) {
  cuda_host::g_dev = {num_sms, cooperative, blocks_per_sm, workers};
}
// A fresh error state for the next call from the tests: clears the calling thread's pending error
// (which, as in CUDA, stays set until cudaGetLastError reads it -- a launcher that returns a failed
// launch's status without reading it leaves it pending) and the last error message.
PTF_EXPORT void cuda_host_reset_error() {
  cuda_host::tl_last_error = cudaSuccess;
  std::lock_guard<std::mutex> lk(cuda_host::g_log_mu);
  cuda_host::g_last_error.clear();
}
// Copies (and clears) the last launch error message / the launch log into buf; returns the length.
PTF_EXPORT size_t cuda_host_take(int which, char* buf, size_t cap) {
  std::lock_guard<std::mutex> lk(cuda_host::g_log_mu);
  std::string& s = which == 0 ? cuda_host::g_last_error : cuda_host::g_launch_log;
  const size_t n = s.size();
  if (buf != nullptr && cap > 0) {
    snprintf(buf, cap, "%s", s.c_str());
    s.clear();
  }
  return n;
}

// The hooks of GCC's -fsanitize=kernel-address (call mode) in the kernel objects.
#define PTF_HOOKS(n)                                                                                     \
  PTF_EXPORT void __asan_load##n##_noabort(uintptr_t a) { cuda_host::on_access(a, n, false); }   \
  PTF_EXPORT void __asan_store##n##_noabort(uintptr_t a) { cuda_host::on_access(a, n, true); }
PTF_HOOKS(1)
PTF_HOOKS(2)
PTF_HOOKS(4)
PTF_HOOKS(8)
PTF_HOOKS(16)
PTF_EXPORT void __asan_loadN_noabort(uintptr_t a, size_t n) { cuda_host::on_access(a, n, false); }
PTF_EXPORT void __asan_storeN_noabort(uintptr_t a, size_t n) { cuda_host::on_access(a, n, true); }
PTF_EXPORT void __asan_handle_no_return() {}
