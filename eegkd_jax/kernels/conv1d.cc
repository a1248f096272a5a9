// 1-D "same" convolution for thin, long signals on the CPU, as XLA FFI handlers (float32).
//
// XLA:CPU's convolution (Eigen) runs U-Sleep's thin full-resolution layers at 9 - 85 GFLOP/s of
// their own multiply-adds on one core; the direct form below, time-major and register-blocked,
// reached 88 - 132 in a first prototype (benchmarks/conv_kernels.py compares these kernels with
// XLA's convolution). Two handlers, both on channels-last arrays as the model holds them:
//
//   eegkd_conv1d        y[b, t, f]     = sum_{j, c} w[j, c, f] x[b, t + j - left, c]
//   eegkd_conv1d_elu    a[b, t, f]     = ELU(y[b, t, f] + bias[f]), and per forward task the sums
//                                        of a and a^2 over its samples (batch-norm statistics)
//   eegkd_conv1d_wgrad  dw[b, j, c, f] = sum_t x[b, t + j - left, c] dy[b, t, f],
//                       db[b, f] = sum_t dy[b, t, f] (the bias gradient)
//
// eegkd_conv1d_elu does in the registers that hold a block of outputs what would otherwise be
// three more passes over the layer's output in memory (bias + ELU, the sum, the sum of squares).
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

typedef int32_t vi __attribute__((vector_size(64)));

// exp(x) for x <= 0 (ELU's negative side), 16 lanes at once: x = n ln2 + r with n = round(x /
// ln2) and |r| <= ln2 / 2, exp(r) by its degree-6 Taylor-like polynomial (Cephes' expf
// coefficients, within 2 ulp), times 2^n built in the exponent bits. Below -87 the result
// would be subnormal; x is clamped there (exp(-87) - 1 == -1 in float32 anyway).
inline vf ExpNonPositive(vf x) {
  const vf lo = vf{} - 87.0f;
  x = x < lo ? lo : x;
  const vf shifter = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vf n = (x * 1.44269504088896341f + shifter) - shifter;
  const vf r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 in two parts, exact n * hi
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

const vf kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

// The fused epilogue of eegkd_conv1d_elu: the bias, then ELU, and the running sums of the
// outputs and their squares per channel (kLanes partial sums each, added up per task).
struct Epilogue {
  const float* bias;  // (f,)
  vf* sum;            // (f,) vectors
  vf* sum_sq;         // (f,) vectors
};

// out[ch * row + s] = x[s * c + ch] for s in [0, n): a (time, channel) -> (channel, time)
// transpose, done in tiles of 64 samples, each written one channel row at a time. Sample by sample
// (all channels of a sample, then the next) it ran 4 - 5x slower at 18 - 22 channels: the writes
// went to c rows a whole row apart at once, more than the cache's ways could keep.
inline void ToChannelMajor(const float* x, int64_t c, int64_t n, float* out, int64_t row) {
  constexpr int64_t kTile = 64;
  for (int64_t s0 = 0; s0 < n; s0 += kTile) {
    const int64_t s1 = std::min<int64_t>(n, s0 + kTile);
    for (int64_t ch = 0; ch < c; ++ch) {
      float* dst = out + ch * row;
      const float* src = x + ch;
      for (int64_t s = s0; s < s1; ++s) dst[s] = src[s * c];
    }
  }
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
    if (last > first)
      ToChannelMajor(x + first * c, c, last - first, data + first - begin + left, row);
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
                         float* y, int64_t n, int64_t f, int64_t t0, const Epilogue* epi) {
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
  const int64_t stored = std::min<int64_t>(kTimeBlock, n - t0);
  if (epi != nullptr) {
    for (int fb = 0; fb < FB; ++fb) {
      vf sum{}, sum_sq{};
      for (int v = 0; v < kTimeVectors; ++v) {
        const vf z = acc[fb][v] + epi->bias[f0 + fb];
        const vf zero{};
        // min(z, 0) written so that a NaN stays NaN (as in XLA's ELU): a diverging model must
        // show NaN, not zeros.
        const vf a = z > zero ? z : ExpNonPositive(z > zero ? zero : z) - 1.0f;
        acc[fb][v] = a;
        // Samples past the chunk's end (the last block only) are computed but not outputs: a
        // lane mask, since indexing a vector by a runtime lane keeps it out of registers.
        const vf counted = kLaneIndex < static_cast<float>(stored - kLanes * v) ? a : zero;
        sum += counted;
        sum_sq += counted * counted;
      }
      epi->sum[f0 + fb] += sum;
      epi->sum_sq[f0 + fb] += sum_sq;
    }
  }
  // Into y (time-major): sample by sample, this block's FB channels side by side.
  for (int64_t s = 0; s < stored; ++s) {
    float* ys = y + (t0 + s) * f + f0;
    for (int fb = 0; fb < FB; ++fb) ys[fb] = acc[fb][s / kLanes][s % kLanes];
  }
}

// Outputs [begin, begin + n) of one example; y points at output sample `begin`.
void ForwardChunk(const float* x, const float* w_fcj, float* y, int64_t t, int64_t c,
                  int64_t f, int64_t k, int64_t left, int64_t begin, int64_t n,
                  const Epilogue* epi = nullptr) {
  Padded xp(x, t, c, left, k, begin, n);
  // Time blocks outermost: the block's window of every input channel stays in L1 while all the
  // output-channel blocks read it.
  for (int64_t t0 = 0; t0 < n; t0 += kTimeBlock) {
    for (int64_t f0 = 0; f0 < f; f0 += kMaxOutBlock) {
      const int64_t fb = std::min<int64_t>(kMaxOutBlock, f - f0);
      switch (fb) {  // constant block sizes, so that the blocks stay in registers
        case 1: ForwardBlock<1>(xp, c, w_fcj, k, f0, y, n, f, t0, epi); break;
        case 2: ForwardBlock<2>(xp, c, w_fcj, k, f0, y, n, f, t0, epi); break;
        case 3: ForwardBlock<3>(xp, c, w_fcj, k, f0, y, n, f, t0, epi); break;
        case 4: ForwardBlock<4>(xp, c, w_fcj, k, f0, y, n, f, t0, epi); break;
        case 5: ForwardBlock<5>(xp, c, w_fcj, k, f0, y, n, f, t0, epi); break;
        default: ForwardBlock<6>(xp, c, w_fcj, k, f0, y, n, f, t0, epi); break;
      }
    }
  }
}

// dw[j, c, f] of one example. Register blocks of FB output channels x JB taps of one input
// channel: per 16 samples, FB + JB vector loads feed FB * JB multiply-adds into vector
// accumulators over time. Time goes in tiles of kWeightTile samples, so that the tile of dy
// (all f channels) and of x stay in the L1 cache while every block passes over them (untiled,
// each block streamed the whole example from L2, which bounded this kernel at half the forward
// pass's rate; tiled, U-Sleep's shapes ran 20 - 35% faster, tiles of 256 - 1024 alike within the
// noise); the accumulators live in `acc` (one vector per (j, c, f)) between tiles and are
// summed across lanes at the end. Taps in blocks of 3: U-Sleep's 9-tap kernels split evenly
// (blocks of 4 left a 1-tap block), and 6 x 3 accumulators leave registers for the loads.
constexpr int kTapBlock = 3;
constexpr int64_t kWeightTile = 512;

template <int FB, int JB>
inline void WeightGradBlock(const float* xc, const float* g, int64_t t_pad, int64_t s0,
                            int64_t s1, int64_t j0, int64_t f0, int64_t c, int64_t ch, int64_t f,
                            vf* acc_mem) {
  vf acc[FB][JB];
  for (int a = 0; a < FB; ++a)
    for (int j = 0; j < JB; ++j) acc[a][j] = acc_mem[((j0 + j) * c + ch) * f + f0 + a];
  for (int64_t s = s0; s < s1; s += kLanes) {
    vf gv[FB], xv[JB];
    for (int a = 0; a < FB; ++a) gv[a] = Load(g + (f0 + a) * t_pad + s);
    for (int j = 0; j < JB; ++j) xv[j] = Load(xc + s + j0 + j);
    for (int a = 0; a < FB; ++a)
      for (int j = 0; j < JB; ++j) acc[a][j] += xv[j] * gv[a];
  }
  for (int a = 0; a < FB; ++a)
    for (int j = 0; j < JB; ++j) acc_mem[((j0 + j) * c + ch) * f + f0 + a] = acc[a][j];
}

template <int FB>
inline void WeightGradTaps(int64_t jn, const float* xc, const float* g, int64_t t_pad,
                           int64_t s0, int64_t s1, int64_t j0, int64_t f0, int64_t c, int64_t ch,
                           int64_t f, vf* acc) {
  switch (jn) {  // constant block sizes, so that the accumulators stay in registers
    case 1: WeightGradBlock<FB, 1>(xc, g, t_pad, s0, s1, j0, f0, c, ch, f, acc); break;
    case 2: WeightGradBlock<FB, 2>(xc, g, t_pad, s0, s1, j0, f0, c, ch, f, acc); break;
    default: WeightGradBlock<FB, 3>(xc, g, t_pad, s0, s1, j0, f0, c, ch, f, acc); break;
  }
}

void WeightGradExample(const float* x, const float* dy, float* dw, float* db, int64_t t,
                       int64_t c, int64_t f, int64_t k, int64_t left) {
  Padded xp(x, t, c, left, k, 0, t);
  const int64_t t_pad = (t + kLanes - 1) / kLanes * kLanes;
  thread_local std::vector<float> g;  // dy channel-major, zeros past t
  g.assign(f * t_pad, 0.0f);
  ToChannelMajor(dy, f, t, g.data(), t_pad);
  // The bias gradient, while dy is at hand: one sum per channel over the example.
  for (int64_t ch = 0; ch < f; ++ch) {
    vf sum{};
    for (int64_t s = 0; s < t_pad; s += kLanes) sum += Load(g.data() + ch * t_pad + s);
    float total = 0.0f;
    for (int l = 0; l < kLanes; ++l) total += sum[l];
    db[ch] = total;
  }
  thread_local std::vector<vf> acc;
  acc.assign(k * c * f, vf{});
  const float* gp = g.data();
  for (int64_t s0 = 0; s0 < t_pad; s0 += kWeightTile) {
    const int64_t s1 = std::min<int64_t>(t_pad, s0 + kWeightTile);
    for (int64_t ch = 0; ch < c; ++ch) {
      const float* xc = xp.data + ch * xp.row;
      for (int64_t j0 = 0; j0 < k; j0 += kTapBlock) {
        const int64_t jn = std::min<int64_t>(kTapBlock, k - j0);
        for (int64_t f0 = 0; f0 < f; f0 += kMaxOutBlock) {
          vf* a = acc.data();
          switch (std::min<int64_t>(kMaxOutBlock, f - f0)) {
            case 1: WeightGradTaps<1>(jn, xc, gp, t_pad, s0, s1, j0, f0, c, ch, f, a); break;
            case 2: WeightGradTaps<2>(jn, xc, gp, t_pad, s0, s1, j0, f0, c, ch, f, a); break;
            case 3: WeightGradTaps<3>(jn, xc, gp, t_pad, s0, s1, j0, f0, c, ch, f, a); break;
            case 4: WeightGradTaps<4>(jn, xc, gp, t_pad, s0, s1, j0, f0, c, ch, f, a); break;
            case 5: WeightGradTaps<5>(jn, xc, gp, t_pad, s0, s1, j0, f0, c, ch, f, a); break;
            default: WeightGradTaps<6>(jn, xc, gp, t_pad, s0, s1, j0, f0, c, ch, f, a); break;
          }
        }
      }
    }
  }
  for (int64_t i = 0; i < k * c * f; ++i) {
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += acc[i][l];
    dw[i] = sum;  // acc is laid out as dw: (j, c, f)
  }
}

ffi::Error CheckShapes(int64_t left, int64_t k) {
  if (k < 1 || left < 0 || left >= k)
    return ffi::Error::InvalidArgument("eegkd conv1d: need kernel >= 1 and 0 <= left < kernel");
  return ffi::Error::Success();
}

// (k, c, f) -> (f, c, k): each output channel's taps contiguous.
std::vector<float> TapsByOutput(const float* wp, int64_t k, int64_t c, int64_t f) {
  std::vector<float> w_fcj(f * c * k);
  for (int64_t j = 0; j < k; ++j)
    for (int64_t ch = 0; ch < c; ++ch)
      for (int64_t o = 0; o < f; ++o) w_fcj[(o * c + ch) * k + j] = wp[(j * c + ch) * f + o];
  return w_fcj;
}

int64_t Chunks(int64_t t) { return (t + kChunk - 1) / kChunk; }

ffi::Error Conv1dImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> x,
                      ffi::Buffer<ffi::F32, 3> w, ffi::ResultBuffer<ffi::F32, 3> y,
                      int64_t left) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  const int64_t b = xd[0], t = xd[1], c = xd[2], k = wd[0], f = wd[2];
  if (wd[1] != c) return ffi::Error::InvalidArgument("eegkd conv1d: kernel channels != input's");
  if (auto error = CheckShapes(left, k); error.failure()) return error;
  const std::vector<float> w_fcj = TapsByOutput(w.typed_data(), k, c, f);
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  // Tasks of up to kChunk samples, so that one long example (a whole night) uses every thread.
  const int64_t chunks = Chunks(t);
  ParallelFor(pool, b * chunks, [&](int64_t i) {
    const int64_t e = i / chunks, begin = (i % chunks) * kChunk;
    ForwardChunk(xp + e * t * c, w_fcj.data(), yp + (e * t + begin) * f, t, c, f, k, left, begin,
                 std::min<int64_t>(kChunk, t - begin));
  });
  return ffi::Error::Success();
}

// a = ELU(conv + bias) and, per task (example e, chunk i: row e * chunks + i of `stats`), the
// sums of a and of a^2 over the task's samples. Every task writes its own row, so no two threads
// add into the same sums and the result does not depend on the thread count or schedule.
ffi::Error Conv1dEluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> x,
                         ffi::Buffer<ffi::F32, 3> w, ffi::Buffer<ffi::F32, 1> bias,
                         ffi::ResultBuffer<ffi::F32, 3> y, ffi::ResultBuffer<ffi::F32, 3> stats,
                         int64_t left) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = stats->dimensions();
  const int64_t b = xd[0], t = xd[1], c = xd[2], k = wd[0], f = wd[2];
  const int64_t chunks = Chunks(t);
  if (wd[1] != c || bias.dimensions()[0] != f || sd[0] != b * chunks || sd[1] != 2 || sd[2] != f)
    return ffi::Error::InvalidArgument("eegkd conv1d_elu: shapes do not agree");
  if (auto error = CheckShapes(left, k); error.failure()) return error;
  const std::vector<float> w_fcj = TapsByOutput(w.typed_data(), k, c, f);
  const float* xp = x.typed_data();
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  float* sp = stats->typed_data();
  ParallelFor(pool, b * chunks, [&](int64_t i) {
    const int64_t e = i / chunks, begin = (i % chunks) * kChunk;
    thread_local std::vector<vf> sums;
    sums.assign(2 * f, vf{});
    const Epilogue epi{bp, sums.data(), sums.data() + f};
    ForwardChunk(xp + e * t * c, w_fcj.data(), yp + (e * t + begin) * f, t, c, f, k, left, begin,
                 std::min<int64_t>(kChunk, t - begin), &epi);
    for (int64_t o = 0; o < f; ++o) {
      float sum = 0.0f, sum_sq = 0.0f;
      for (int l = 0; l < kLanes; ++l) {
        sum += epi.sum[o][l];
        sum_sq += epi.sum_sq[o][l];
      }
      sp[(i * 2) * f + o] = sum;
      sp[(i * 2 + 1) * f + o] = sum_sq;
    }
  });
  return ffi::Error::Success();
}

ffi::Error Conv1dWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> x,
                                ffi::Buffer<ffi::F32, 3> dy, ffi::ResultBuffer<ffi::F32, 4> dw,
                                ffi::ResultBuffer<ffi::F32, 2> db, int64_t left) {
  const auto xd = x.dimensions(), gd = dy.dimensions(), wd = dw->dimensions();
  const auto bd = db->dimensions();
  const int64_t b = xd[0], t = xd[1], c = xd[2], f = gd[2], k = wd[1];
  if (gd[0] != b || gd[1] != t || wd[0] != b || wd[2] != c || wd[3] != f || bd[0] != b ||
      bd[1] != f)
    return ffi::Error::InvalidArgument("eegkd conv1d_wgrad: shapes do not agree");
  if (auto error = CheckShapes(left, k); error.failure()) return error;
  const float* xp = x.typed_data();
  const float* gp = dy.typed_data();
  float* out = dw->typed_data();
  float* bias_out = db->typed_data();
  ParallelFor(pool, b, [&](int64_t i) {
    WeightGradExample(xp + i * t * c, gp + i * t * f, out + i * k * c * f, bias_out + i * f, t, c,
                      f, k, left);
  });
  return ffi::Error::Success();
}

// Aliases: a comma inside a template argument list would split the macro arguments below.
using Rank1 = ffi::Buffer<ffi::F32, 1>;
using Rank2 = ffi::Buffer<ffi::F32, 2>;
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(EegkdConv1dElu, Conv1dEluImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank3>()
                                  .Arg<Rank3>()
                                  .Arg<Rank1>()
                                  .Ret<Rank3>()
                                  .Ret<Rank3>()
                                  .Attr<int64_t>("left"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EegkdConv1dWeightGrad, Conv1dWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank3>()
                                  .Arg<Rank3>()
                                  .Ret<Rank4>()
                                  .Ret<Rank2>()
                                  .Attr<int64_t>("left"));
