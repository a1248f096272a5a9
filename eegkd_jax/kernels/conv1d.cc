// 1-D "same" convolution for thin, long signals on the CPU, as XLA FFI handlers (float32).
//
// XLA:CPU's convolution (Eigen) runs U-Sleep's thin full-resolution layers at 9 - 85 GFLOP/s of
// their own multiply-adds on one core; the direct form below, time-major and register-blocked,
// reached 88 - 132 in a first prototype (benchmarks/conv_kernels.py compares these kernels with
// XLA's convolution). Two handlers, both on channels-last arrays as the model holds them:
//
//   eegkd_conv1d        y[b, t, f]     = sum_{j, c} w[j, c, f] x[b, t + j - left, c]
//   eegkd_conv1d_wgrad  dw[b, j, c, f] = sum_t x[b, t + j - left, c] dy[b, t, f]
//
// (the input gradient is eegkd_conv1d of dy with the kernel flipped and transposed; the weight
// gradient is per example and XLA sums it over the batch, so no two examples share an output).
// Samples outside [0, T) read as zero. Each example, or chunk of one, is copied into a
// zero-padded channel-major scratch block, so inner loops run over contiguous time with 16-float
// vectors (GCC's vector extension: one AVX-512 register, two AVX2 ones, or four SSE); examples and
// chunks are shared among XLA's intra-op threads, the calling thread included, so a call never
// waits on a pool that is busy elsewhere.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float vf __attribute__((vector_size(64)));
constexpr int kLanes = 16;
constexpr int kTimeVectors = 4;  // output vectors per register block
constexpr int kMaxOutBlock = 6;  // output channels per register block
constexpr int kTimeBlock = kLanes * kTimeVectors;
constexpr int64_t kChunk = 32 * kTimeBlock;  // samples per forward task

inline vf Load(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

// Rows of a channel-major, zero-padded copy of samples [begin - left, begin + n + k) of one
// example (x: (t, c)): row c holds x[begin + s - left, c] at s, zeros outside the signal, and room
// to read a whole register block past the end.
struct Padded {
  int64_t row;  // floats per row
  float* data;  // a per-thread buffer, reused by the thread's next task

  Padded(const float* x, int64_t t, int64_t c, int64_t left, int64_t k, int64_t begin,
         int64_t n) {
    thread_local std::vector<float> buffer;
    row = n + k + kTimeBlock;
    buffer.assign(c * row, 0.0f);
    data = buffer.data();
    const int64_t first = std::max<int64_t>(0, begin - left);
    const int64_t last = std::min<int64_t>(t, begin - left + n + k);
    for (int64_t s = first; s < last; ++s)
      for (int64_t ch = 0; ch < c; ++ch) data[ch * row + s - begin + left] = x[s * c + ch];
  }
};

// Runs body(i) for i in [0, n) on the pool's threads and the caller's; returns when all are done.
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Shared {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> done{0};
    std::mutex mutex;
    std::condition_variable finished;
  };
  auto shared = std::make_shared<Shared>();
  auto work = [shared, n, body]() {
    for (int64_t i; (i = shared->next.fetch_add(1)) < n;) {
      body(i);
      if (shared->done.fetch_add(1) + 1 == n) {
        std::lock_guard<std::mutex> lock(shared->mutex);
        shared->finished.notify_all();
      }
    }
  };
  int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work]() { work(); });
  work();  // a helper that starts late finds nothing left and returns
  std::unique_lock<std::mutex> lock(shared->mutex);
  shared->finished.wait(lock, [&] { return shared->done.load() == n; });
}

// One register block of the forward pass: output channels [f0, f0 + FB) at samples
// [t0, t0 + kTimeBlock) of a chunk of n samples (y: the chunk's first output sample).
template <int FB>
inline void ForwardBlock(const Padded& xp, int64_t c, const float* w_fcj, int64_t k, int64_t f0,
                         float* y, int64_t n, int64_t f, int64_t t0) {
  vf acc[FB][kTimeVectors];
  for (int fb = 0; fb < FB; ++fb)
    for (int v = 0; v < kTimeVectors; ++v) acc[fb][v] = vf{};
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* xc = xp.data + ch * xp.row + t0;
    for (int64_t j = 0; j < k; ++j) {
      vf xv[kTimeVectors];
      for (int v = 0; v < kTimeVectors; ++v) xv[v] = Load(xc + j + kLanes * v);
      for (int fb = 0; fb < FB; ++fb) {
        const float wj = w_fcj[((f0 + fb) * c + ch) * k + j];
        for (int v = 0; v < kTimeVectors; ++v) acc[fb][v] += wj * xv[v];
      }
    }
  }
  // Into y (time-major): sample by sample, this block's FB channels side by side.
  const int64_t stored = std::min<int64_t>(kTimeBlock, n - t0);
  for (int64_t s = 0; s < stored; ++s) {
    float* ys = y + (t0 + s) * f + f0;
    for (int fb = 0; fb < FB; ++fb) ys[fb] = acc[fb][s / kLanes][s % kLanes];
  }
}

// Outputs [begin, begin + n) of one example; y points at output sample `begin`.
void ForwardChunk(const float* x, const float* w_fcj, float* y, int64_t t, int64_t c,
                  int64_t f, int64_t k, int64_t left, int64_t begin, int64_t n) {
  Padded xp(x, t, c, left, k, begin, n);
  for (int64_t f0 = 0; f0 < f; f0 += kMaxOutBlock) {
    const int64_t fb = std::min<int64_t>(kMaxOutBlock, f - f0);
    for (int64_t t0 = 0; t0 < n; t0 += kTimeBlock) {
      switch (fb) {  // constant block sizes, so that the blocks stay in registers
        case 1: ForwardBlock<1>(xp, c, w_fcj, k, f0, y, n, f, t0); break;
        case 2: ForwardBlock<2>(xp, c, w_fcj, k, f0, y, n, f, t0); break;
        case 3: ForwardBlock<3>(xp, c, w_fcj, k, f0, y, n, f, t0); break;
        case 4: ForwardBlock<4>(xp, c, w_fcj, k, f0, y, n, f, t0); break;
        case 5: ForwardBlock<5>(xp, c, w_fcj, k, f0, y, n, f, t0); break;
        default: ForwardBlock<6>(xp, c, w_fcj, k, f0, y, n, f, t0); break;
      }
    }
  }
}

// dw[j, c, f] of one example. Register blocks of FB output channels x JB taps of one input
// channel: per 16 samples, FB + JB vector loads feed FB * JB multiply-adds into vector
// accumulators over time, summed across lanes at the end.
constexpr int kTapBlock = 4;

template <int FB, int JB>
inline void WeightGradBlock(const float* xc, const float* g, int64_t t_pad, int64_t j0,
                            int64_t f0, int64_t c, int64_t ch, int64_t f, float* dw) {
  vf acc[FB][JB];
  for (int a = 0; a < FB; ++a)
    for (int j = 0; j < JB; ++j) acc[a][j] = vf{};
  for (int64_t s = 0; s < t_pad; s += kLanes) {
    vf gv[FB], xv[JB];
    for (int a = 0; a < FB; ++a) gv[a] = Load(g + (f0 + a) * t_pad + s);
    for (int j = 0; j < JB; ++j) xv[j] = Load(xc + s + j0 + j);
    for (int a = 0; a < FB; ++a)
      for (int j = 0; j < JB; ++j) acc[a][j] += xv[j] * gv[a];
  }
  for (int a = 0; a < FB; ++a)
    for (int j = 0; j < JB; ++j) {
      float sum = 0.0f;
      for (int l = 0; l < kLanes; ++l) sum += acc[a][j][l];
      dw[((j0 + j) * c + ch) * f + f0 + a] = sum;
    }
}

template <int FB>
inline void WeightGradTaps(int64_t jn, const float* xc, const float* g, int64_t t_pad,
                           int64_t j0, int64_t f0, int64_t c, int64_t ch, int64_t f, float* dw) {
  switch (jn) {  // constant block sizes, so that the accumulators stay in registers
    case 1: WeightGradBlock<FB, 1>(xc, g, t_pad, j0, f0, c, ch, f, dw); break;
    case 2: WeightGradBlock<FB, 2>(xc, g, t_pad, j0, f0, c, ch, f, dw); break;
    case 3: WeightGradBlock<FB, 3>(xc, g, t_pad, j0, f0, c, ch, f, dw); break;
    default: WeightGradBlock<FB, 4>(xc, g, t_pad, j0, f0, c, ch, f, dw); break;
  }
}

void WeightGradExample(const float* x, const float* dy, float* dw, int64_t t, int64_t c,
                       int64_t f, int64_t k, int64_t left) {
  Padded xp(x, t, c, left, k, 0, t);
  const int64_t t_pad = (t + kLanes - 1) / kLanes * kLanes;
  thread_local std::vector<float> g;  // dy channel-major, zeros past t
  g.assign(f * t_pad, 0.0f);
  for (int64_t s = 0; s < t; ++s)
    for (int64_t ch = 0; ch < f; ++ch) g[ch * t_pad + s] = dy[s * f + ch];
  for (int64_t ch = 0; ch < c; ++ch) {
    const float* xc = xp.data + ch * xp.row;
    for (int64_t j0 = 0; j0 < k; j0 += kTapBlock) {
      const int64_t jn = std::min<int64_t>(kTapBlock, k - j0);
      for (int64_t f0 = 0; f0 < f; f0 += kMaxOutBlock) {
        const float* gp = g.data();
        switch (std::min<int64_t>(kMaxOutBlock, f - f0)) {
          case 1: WeightGradTaps<1>(jn, xc, gp, t_pad, j0, f0, c, ch, f, dw); break;
          case 2: WeightGradTaps<2>(jn, xc, gp, t_pad, j0, f0, c, ch, f, dw); break;
          case 3: WeightGradTaps<3>(jn, xc, gp, t_pad, j0, f0, c, ch, f, dw); break;
          case 4: WeightGradTaps<4>(jn, xc, gp, t_pad, j0, f0, c, ch, f, dw); break;
          case 5: WeightGradTaps<5>(jn, xc, gp, t_pad, j0, f0, c, ch, f, dw); break;
          default: WeightGradTaps<6>(jn, xc, gp, t_pad, j0, f0, c, ch, f, dw); break;
        }
      }
    }
  }
}

ffi::Error CheckShapes(int64_t left, int64_t k) {
  if (k < 1 || left < 0 || left >= k)
    return ffi::Error::InvalidArgument("eegkd conv1d: need kernel >= 1 and 0 <= left < kernel");
  return ffi::Error::Success();
}

ffi::Error Conv1dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> x,
                      ffi::Buffer<ffi::F32, 3> w, ffi::ResultBuffer<ffi::F32, 3> y,
                      int64_t left) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t b = xd[0], t = xd[1], c = xd[2], k = wd[0], f = wd[2];
  if (wd[1] != c) return ffi::Error::InvalidArgument("eegkd conv1d: kernel channels != input's");
  if (auto error = CheckShapes(left, k); error.failure()) return error;
  // (k, c, f) -> (f, c, k): each output channel's taps contiguous.
  std::vector<float> w_fcj(f * c * k);
  const float* wp = w.typed_data();
  for (int64_t j = 0; j < k; ++j)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t o = 0; o < f; ++o) w_fcj[(o * c + ch) * k + j] = wp[(j * c + ch) * f + o];
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  // Tasks of up to kChunk samples, so that one long example (a whole night) uses every thread.
  const int64_t chunks = (t + kChunk - 1) / kChunk;
  ParallelFor(pool, b * chunks, [&](int64_t i) {
    const int64_t e = i / chunks, begin = (i % chunks) * kChunk;
    ForwardChunk(xp + e * t * c, w_fcj.data(), yp + (e * t + begin) * f, t, c, f, k, left, begin,
                 std::min<int64_t>(kChunk, t - begin));
  });
  return ffi::Error::Success();
}

ffi::Error Conv1dWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> x,
                                ffi::Buffer<ffi::F32, 3> dy, ffi::ResultBuffer<ffi::F32, 4> dw,
                                int64_t left) {
  const auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  const int64_t b = xd[0], t = xd[1], c = xd[2], f = gd[2], k = wd[1];
  if (gd[0] != b || gd[1] != t || wd[0] != b || wd[2] != c || wd[3] != f)
    return ffi::Error::InvalidArgument("eegkd conv1d_wgrad: shapes do not agree");
  if (auto error = CheckShapes(left, k); error.failure()) return error;
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  float* out = dw->typed_data();
  ParallelFor(pool, b, [&](int64_t i) {
    WeightGradExample(xp + i * t * c, gp + i * t * f, out + i * k * c * f, t, c, f, k, left);
  });
  return ffi::Error::Success();
}

// Aliases: a comma inside a template argument list would split the macro arguments below.
using Rank3 = ffi::Buffer<ffi::F32, 3>;
using Rank4 = ffi::Buffer<ffi::F32, 4>;

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(EegkdConv1d, Conv1dImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank3>()
                                  .Arg<Rank3>()
                                  .Ret<Rank3>()
                                  .Attr<int64_t>("left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EegkdConv1dWeightGrad, Conv1dWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank3>()
                                  .Arg<Rank3>()
                                  .Ret<Rank4>()
                                  .Attr<int64_t>("left"));
