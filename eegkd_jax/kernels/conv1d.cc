// 1-D "same" convolution for thin, long signals on the CPU, as XLA FFI handlers (float32).
//
// XLA:CPU's convolution (Eigen) runs U-Sleep's thin full-resolution layers at 9 - 85 GFLOP/s of
// their own multiply-adds on one core; the direct form below, time-major and register-blocked,
// reached 88 - 132 in a first prototype (benchmarks/conv_kernels.py compares these kernels with
// XLA's convolution). Three convolution handlers, all on channels-last arrays as the model holds
// them (below), and two for the train step's optimiser that take all of a network's parameter
// arrays at once: eegkd_sum_of_squares (a gradient's global norm) and eegkd_adam (see there).
//
//   eegkd_conv1d        y[b, t, f]     = sum_{j, c} w[j, c, f] x[b, t + j - left, c]
//   eegkd_conv1d_elu    a[b, t, f]     = ELU(y[b, t, f] + bias[f]), and the sums of a and a^2
//                                        over batch and time (batch-norm statistics)
//   eegkd_conv1d_wgrad  dw[j, c, f]    = sum_{b, t} x[b, t + j - left, c] dy[b, t, f],
//                       db[f]          = sum_{b, t} dy[b, t, f] (the bias gradient)
//
// eegkd_conv1d_elu does in the registers that hold a block of outputs what would otherwise be
// three more passes over the layer's output in memory (bias + ELU, the sum, the sum of squares).
// Its x, and eegkd_conv1d_wgrad's, is assembled as it is read (see Input): one or two arrays side
// by side along the channels, each optionally normalised per channel (x * scale + shift, with
// `affine`) and cropped to the conv's length; so batch norm and the decoder's concatenation
// cost no pass of their own.
// (the input gradient is eegkd_conv1d of dy with the kernel flipped and transposed; the weight
// gradient is computed per example and the examples added in order at the end, so no two
// threads share an output and the result does not depend on the schedule).
// Samples outside [0, T) read as zero. Each example, or chunk of one, is copied into a
// zero-padded channel-major scratch block, so inner loops run over contiguous time with 16-float
// vectors (GCC's vector extension: one AVX-512 register, two AVX2 ones, or four SSE); examples and
// chunks are shared among XLA's intra-op threads, the calling thread included, so a call never
// waits on a pool that is busy elsewhere.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <string>
#include <utility>
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

// out[ch * row + s] = x[s * c + ch] * scale[ch] + shift[ch] for s in [0, n) (just x[s * c + ch]
// where scale is null): a (time, channel) -> (channel, time) transpose, done in tiles of 64
// samples, each written one channel row at a time. Sample by sample (all channels of a sample,
// then the next) it ran 4 - 5x slower at 18 - 22 channels: the writes went to c rows a whole row
// apart at once, more than the cache's ways could keep.
inline void ToChannelMajor(const float* x, int64_t c, int64_t n, float* out, int64_t row,
                           const float* scale = nullptr, const float* shift = nullptr) {
  constexpr int64_t kTile = 64;
  for (int64_t s0 = 0; s0 < n; s0 += kTile) {
    const int64_t s1 = std::min<int64_t>(n, s0 + kTile);
    for (int64_t ch = 0; ch < c; ++ch) {
      float* dst = out + ch * row;
      const float* src = x + ch;
      if (scale == nullptr) {
        for (int64_t s = s0; s < s1; ++s) dst[s] = src[s * c];
      } else {
        const float a = scale[ch], b = shift[ch];
        for (int64_t s = s0; s < s1; ++s) dst[s] = src[s * c] * a + b;
      }
    }
  }
}

// A conv's input, one example of it: the channels of up to kMaxSources arrays side by side, each
// read as x * scale + shift per channel (batch norm's affine, applied before the conv's zero
// padding; no scale: as it is) and over the conv's first t samples (an array may be longer: the
// decoder's upsampled signal, cropped to its skip connection). U-Sleep's decoder convolves
// [normalised upsampled, normalised skip] this way without the concatenation ever being written.
constexpr int kMaxSources = 2;
struct Source {
  const float* x;      // (t_source, c), this example's
  int64_t t_source, c;
  const float* scale;  // (c,) or null
  const float* shift;
};
struct Input {
  Source sources[kMaxSources];
  int n = 0;
  int64_t c = 0;  // all channels

  void Add(const Source& source) {
    sources[n++] = source;
    c += source.c;
  }
  Input Example(int64_t e) const {  // the same, moved to example e
    Input in = *this;
    for (int i = 0; i < n; ++i) in.sources[i].x += e * sources[i].t_source * sources[i].c;
    return in;
  }
};

// Rows of a channel-major, zero-padded copy of samples [begin - left, begin + n + k) of one
// example's input (t samples): row c holds input channel c at sample begin + s - left at s, zeros
// outside the signal, and room to read a whole register block past the end.
struct Padded {
  int64_t row;  // floats per row
  float* data;  // a per-thread buffer, reused by the thread's next task

  Padded(const Input& in, int64_t t, int64_t left, int64_t k, int64_t begin, int64_t n) {
    thread_local std::vector<float> buffer;
    row = n + k + kTimeBlock;
    buffer.assign(in.c * row, 0.0f);
    data = buffer.data();
    const int64_t first = std::max<int64_t>(0, begin - left);
    const int64_t last = std::min<int64_t>(t, begin - left + n + k);
    if (last <= first) return;
    int64_t channel = 0;
    for (int i = 0; i < in.n; ++i) {
      const Source& src = in.sources[i];
      ToChannelMajor(src.x + first * src.c, src.c, last - first,
                     data + channel * row + first - begin + left, row, src.scale, src.shift);
      channel += src.c;
    }
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
void ForwardChunk(const Input& in, const float* w_fcj, float* y, int64_t t, int64_t f,
                  int64_t k, int64_t left, int64_t begin, int64_t n,
                  const Epilogue* epi = nullptr) {
  const int64_t c = in.c;
  Padded xp(in, t, left, k, begin, n);
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

// dw[j, c, f] of one example, as a matrix product over time that needs no transposes. With x
// zero-padded in time (`left` rows before, k - 1 - left after) and flattened, the k * c inputs
// that meet output sample s, m = j * c + ch, are the contiguous floats xp[s * c + m]: so
// dw[m, f] = sum_s xp[s * c + m] dy[s, f], both arrays read as the model holds them (time-major).
// Register blocks of MV vectors of m (16 each) x FB output channels: per sample, MV loads and FB
// broadcasts feed MV * FB multiply-adds into accumulators, each lane its own m, so nothing is
// summed across lanes. Time goes in spans of kWeightSpan samples, each span's sums added into
// `total` (one vector per (m vector, f)): a float32 sum of 6000 terms in one accumulator lost
// more than the tests allow (6e-6 of the largest gradient), one of 256 does not. (The form
// before, channel-major copies of x and dy with time in the lanes, ran at a third to a half of
// the forward kernel's rate for 9 - 30 channels; this one takes 0.4 - 0.7 of its time at
// U-Sleep's shapes, 31 -> 17 ms over all of them, batch 32.)
constexpr int kWeightVectors = 4;  // m vectors per register block (64 inputs)
constexpr int64_t kWeightSpan = 256;

template <int MV, int FB>
inline void WeightGradBlock(const float* xs, const float* gs, int64_t n, int64_t c, int64_t f,
                            vf* total) {
  vf acc[MV][FB];
  for (int v = 0; v < MV; ++v)
    for (int a = 0; a < FB; ++a) acc[v][a] = vf{};
  for (int64_t s = 0; s < n; ++s, xs += c, gs += f) {
    vf xv[MV];
    for (int v = 0; v < MV; ++v) xv[v] = Load(xs + kLanes * v);
    for (int a = 0; a < FB; ++a) {
      const float g = gs[a];
      for (int v = 0; v < MV; ++v) acc[v][a] += xv[v] * g;
    }
  }
  for (int v = 0; v < MV; ++v)
    for (int a = 0; a < FB; ++a) total[v * f + a] += acc[v][a];
}

template <int MV>
inline void WeightGradOutputs(int64_t fb, const float* xs, const float* gs, int64_t n, int64_t c,
                              int64_t f, vf* total) {
  switch (fb) {  // constant block sizes, so that the accumulators stay in registers
    case 1: WeightGradBlock<MV, 1>(xs, gs, n, c, f, total); break;
    case 2: WeightGradBlock<MV, 2>(xs, gs, n, c, f, total); break;
    case 3: WeightGradBlock<MV, 3>(xs, gs, n, c, f, total); break;
    case 4: WeightGradBlock<MV, 4>(xs, gs, n, c, f, total); break;
    case 5: WeightGradBlock<MV, 5>(xs, gs, n, c, f, total); break;
    default: WeightGradBlock<MV, 6>(xs, gs, n, c, f, total); break;
  }
}

void WeightGradExample(const Input& in, const float* dy, float* dw, float* db, int64_t t,
                       int64_t f, int64_t k, int64_t left) {
  // The input with its zero rows, and a register block's worth of zeros past the end: the last
  // block of m may read up to 15 floats beyond the last window (lanes it does not store).
  const int64_t c = in.c;
  thread_local std::vector<float> padded;
  padded.assign((t + k - 1) * c + kLanes * kWeightVectors, 0.0f);
  const Source& first = in.sources[0];
  if (in.n == 1 && first.scale == nullptr) {
    std::memcpy(padded.data() + left * c, first.x, sizeof(float) * t * c);
  } else {
    int64_t channel = 0;
    for (int i = 0; i < in.n; ++i) {
      const Source& src = in.sources[i];
      for (int64_t s = 0; s < t; ++s) {
        float* dst = padded.data() + (left + s) * c + channel;
        const float* x = src.x + s * src.c;
        if (src.scale == nullptr) {
          for (int64_t ch = 0; ch < src.c; ++ch) dst[ch] = x[ch];
        } else {
          for (int64_t ch = 0; ch < src.c; ++ch) dst[ch] = x[ch] * src.scale[ch] + src.shift[ch];
        }
      }
      channel += src.c;
    }
  }
  const int64_t m = k * c, m_vectors = (m + kLanes - 1) / kLanes;
  thread_local std::vector<vf> total;
  total.assign(m_vectors * f, vf{});
  for (int64_t s0 = 0; s0 < t; s0 += kWeightSpan) {
    const int64_t n = std::min<int64_t>(kWeightSpan, t - s0);
    for (int64_t v0 = 0; v0 < m_vectors; v0 += kWeightVectors) {
      const float* xs = padded.data() + s0 * c + v0 * kLanes;
      for (int64_t f0 = 0; f0 < f; f0 += kMaxOutBlock) {
        const int64_t fb = std::min<int64_t>(kMaxOutBlock, f - f0);
        const float* gs = dy + s0 * f + f0;
        vf* out = total.data() + v0 * f + f0;
        switch (std::min<int64_t>(kWeightVectors, m_vectors - v0)) {
          case 1: WeightGradOutputs<1>(fb, xs, gs, n, c, f, out); break;
          case 2: WeightGradOutputs<2>(fb, xs, gs, n, c, f, out); break;
          case 3: WeightGradOutputs<3>(fb, xs, gs, n, c, f, out); break;
          default: WeightGradOutputs<4>(fb, xs, gs, n, c, f, out); break;
        }
      }
    }
  }
  for (int64_t i = 0; i < m; ++i)
    for (int64_t o = 0; o < f; ++o) dw[i * f + o] = total[(i / kLanes) * f + o][i % kLanes];
  // The bias gradient: one sum per channel over the example (in double, for the same reason).
  thread_local std::vector<double> bias_sum;
  bias_sum.assign(f, 0.0);
  for (int64_t s = 0; s < t; ++s)
    for (int64_t o = 0; o < f; ++o) bias_sum[o] += dy[s * f + o];
  for (int64_t o = 0; o < f; ++o) db[o] = static_cast<float>(bias_sum[o]);
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
  Input in;
  in.Add({x.typed_data(), t, c, nullptr, nullptr});
  float* yp = y->typed_data();
  // Tasks of up to kChunk samples, so that one long example (a whole night) uses every thread.
  const int64_t chunks = Chunks(t);
  ParallelFor(pool, b * chunks, [&](int64_t i) {
    const int64_t e = i / chunks, begin = (i % chunks) * kChunk;
    ForwardChunk(in.Example(e), w_fcj.data(), yp + (e * t + begin) * f, t, f, k, left, begin,
                 std::min<int64_t>(kChunk, t - begin));
  });
  return ffi::Error::Success();
}

// The conv's input from the call's remaining arguments: arrays (b, t_i >= t, c_i) one by one, or
// with `affine` each followed by its scale and shift (c_i,). Checks the shapes against b, t, c.
ffi::ErrorOr<Input> ReadInput(const ffi::RemainingArgs& args, bool affine, int64_t b, int64_t t,
                              int64_t c, const char* name) {
  const int64_t per = affine ? 3 : 1;
  const std::string where = std::string("eegkd ") + name + ": ";
  if (args.size() == 0 || args.size() % per != 0 || args.size() / per > kMaxSources)
    return ffi::Unexpected(ffi::Error::InvalidArgument(
        where + "takes 1 - 2 inputs, each an array or (array, scale, shift)"));
  Input in;
  for (size_t i = 0; i < args.size(); i += per) {
    auto x = args.get<ffi::Buffer<ffi::F32, 3>>(i);
    if (x.has_error()) return ffi::Unexpected(x.error());
    const auto xd = x->dimensions();
    Source src{x->typed_data(), xd[1], xd[2], nullptr, nullptr};
    if (xd[0] != b || xd[1] < t)
      return ffi::Unexpected(ffi::Error::InvalidArgument(where + "an input's shape does not fit"));
    if (affine) {
      auto scale = args.get<ffi::Buffer<ffi::F32, 1>>(i + 1);
      auto shift = args.get<ffi::Buffer<ffi::F32, 1>>(i + 2);
      if (scale.has_error()) return ffi::Unexpected(scale.error());
      if (shift.has_error()) return ffi::Unexpected(shift.error());
      if (scale->dimensions()[0] != src.c || shift->dimensions()[0] != src.c)
        return ffi::Unexpected(ffi::Error::InvalidArgument(where + "scale / shift != channels"));
      src.scale = scale->typed_data();
      src.shift = shift->typed_data();
    }
    in.Add(src);
  }
  if (in.c != c)
    return ffi::Unexpected(ffi::Error::InvalidArgument(where + "kernel channels != inputs'"));
  return in;
}

// Adds up `rows` rows of n floats in order into out: the per-task (or per-example) results that
// the handlers below write so that no two threads add into the same sums. Summed here rather
// than by XLA, a program has one reduction fewer to compile per call.
void SumRows(const std::vector<float>& rows, int64_t n, float* out) {
  std::fill(out, out + n, 0.0f);
  for (size_t r = 0; r < rows.size(); r += n)
    for (int64_t i = 0; i < n; ++i) out[i] += rows[r + i];
}

// a = ELU(conv + bias) over the output's t samples and `stats` = (sum of a, sum of a^2) per
// channel. Each task (example e, chunk i) sums its own samples into its own row, and the rows are
// added in task order at the end, so the result does not depend on the thread count or schedule.
ffi::Error Conv1dEluImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> w,
                         ffi::Buffer<ffi::F32, 1> bias, ffi::RemainingArgs args,
                         ffi::ResultBuffer<ffi::F32, 3> y, ffi::ResultBuffer<ffi::F32, 2> stats,
                         int64_t left, bool affine) {
  const auto yd = y->dimensions(), wd = w.dimensions(), sd = stats->dimensions();
  const int64_t b = yd[0], t = yd[1], k = wd[0], c = wd[1], f = wd[2];
  const int64_t chunks = Chunks(t);
  if (yd[2] != f || bias.dimensions()[0] != f || sd[0] != 2 || sd[1] != f)
    return ffi::Error::InvalidArgument("eegkd conv1d_elu: shapes do not agree");
  if (auto error = CheckShapes(left, k); error.failure()) return error;
  const auto in = ReadInput(args, affine, b, t, c, "conv1d_elu");
  if (in.has_error()) return in.error();
  const std::vector<float> w_fcj = TapsByOutput(w.typed_data(), k, c, f);
  const float* bp = bias.typed_data();
  float* yp = y->typed_data();
  std::vector<float> rows(b * chunks * 2 * f);
  ParallelFor(pool, b * chunks, [&](int64_t i) {
    const int64_t e = i / chunks, begin = (i % chunks) * kChunk;
    thread_local std::vector<vf> sums;
    sums.assign(2 * f, vf{});
    const Epilogue epi{bp, sums.data(), sums.data() + f};
    ForwardChunk(in->Example(e), w_fcj.data(), yp + (e * t + begin) * f, t, f, k, left, begin,
                 std::min<int64_t>(kChunk, t - begin), &epi);
    for (int64_t o = 0; o < f; ++o) {
      float sum = 0.0f, sum_sq = 0.0f;
      for (int l = 0; l < kLanes; ++l) {
        sum += epi.sum[o][l];
        sum_sq += epi.sum_sq[o][l];
      }
      rows[(i * 2) * f + o] = sum;
      rows[(i * 2 + 1) * f + o] = sum_sq;
    }
  });
  SumRows(rows, 2 * f, stats->typed_data());
  return ffi::Error::Success();
}

// dw (k, c, f) and db (f,) summed over the batch: each example's into its own rows, added in
// example order at the end.
ffi::Error Conv1dWeightGradImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 3> dy,
                                ffi::RemainingArgs args, ffi::ResultBuffer<ffi::F32, 3> dw,
                                ffi::ResultBuffer<ffi::F32, 1> db, int64_t left, bool affine) {
  const auto gd = dy.dimensions(), wd = dw->dimensions();
  const int64_t b = gd[0], t = gd[1], f = gd[2], k = wd[0], c = wd[1];
  if (wd[2] != f || db->dimensions()[0] != f)
    return ffi::Error::InvalidArgument("eegkd conv1d_wgrad: shapes do not agree");
  if (auto error = CheckShapes(left, k); error.failure()) return error;
  const auto in = ReadInput(args, affine, b, t, c, "conv1d_wgrad");
  if (in.has_error()) return in.error();
  const float* gp = dy.typed_data();
  std::vector<float> weight_rows(b * k * c * f), bias_rows(b * f);
  ParallelFor(pool, b, [&](int64_t i) {
    WeightGradExample(in->Example(i), gp + i * t * f, weight_rows.data() + i * k * c * f,
                      bias_rows.data() + i * f, t, f, k, left);
  });
  SumRows(weight_rows, k * c * f, dw->typed_data());
  SumRows(bias_rows, f, db->typed_data());
  return ffi::Error::Success();
}

// Sum of the squares of every element of every argument (float32 arrays of any shape): the
// global norm of a gradient, one call for all of a network's arrays. XLA compiles a norm written
// per array (a square-and-sum for each, then their total) as 3 - 4 small fusions per array, which
// for two U-Sleeps was ~440 of the online-KD step's 2,565 fusions and ~2 s of its compile time.
// The arrays are cut into pieces of up to kPiece elements that the threads share; each piece sums
// in sixteen float lanes over runs of 1024 elements, each run's total added in double (a float32
// accumulator over millions of squares would lose the small ones), and the pieces' totals are
// added in order, so the result does not depend on the schedule.
double SumOfSquaresPiece(const float* p, int64_t n) {
  constexpr int64_t kRun = 1024;
  double total = 0.0;
  for (int64_t begin = 0; begin < n; begin += kRun) {
    const int64_t end = std::min(n, begin + kRun);
    float lanes[16] = {};
    int64_t e = begin;
    for (; e + 16 <= end; e += 16)
      for (int l = 0; l < 16; ++l) lanes[l] += p[e + l] * p[e + l];
    double run = 0.0;
    for (; e < end; ++e) run += static_cast<double>(p[e]) * p[e];
    for (int l = 0; l < 16; ++l) run += lanes[l];
    total += run;
  }
  return total;
}

ffi::Error SumOfSquaresImpl(ffi::ThreadPool pool, ffi::RemainingArgs args,
                            ffi::ResultBuffer<ffi::F32, 0> out) {
  constexpr int64_t kPiece = 1 << 16;
  std::vector<std::pair<const float*, int64_t>> pieces;
  for (size_t i = 0; i < args.size(); ++i) {
    auto array = args.get<ffi::AnyBuffer>(i);
    if (array.has_error()) return array.error();
    if (array->element_type() != ffi::F32)
      return ffi::Error::InvalidArgument("eegkd sum_of_squares: argument " + std::to_string(i) +
                                         " is not float32");
    const float* p = array->typed_data<float>();
    const int64_t n = static_cast<int64_t>(array->element_count());
    for (int64_t first = 0; first < n; first += kPiece)
      pieces.emplace_back(p + first, std::min(kPiece, n - first));
  }
  std::vector<double> totals(pieces.size());
  ParallelFor(pool, static_cast<int64_t>(pieces.size()), [&](int64_t i) {
    totals[i] = SumOfSquaresPiece(pieces[i].first, pieces[i].second);
  });
  double total = 0.0;
  for (double piece : totals) total += piece;
  *out->typed_data() = static_cast<float>(total);
  return ffi::Error::Success();
}

// One Adam step over all of a network's parameter arrays, in place: for every element, in
// optax's order of operations (clip_by_global_norm, add_decayed_weights, scale_by_adam,
// scale_by_learning_rate, apply_updates),
//
//   g  = grad                       (or grad / norm * max_norm where clipping applies)
//   g  = g + weight_decay * p       (L2 decay, as PyTorch's Adam)
//   mu = (1 - b1) * g + b1 * mu,    nu = (1 - b2) * g * g + b2 * nu
//   p  = p + step * ((mu / bc1) / (sqrt(nu / bc2 + eps_root) + eps))
//
// with mu and nu the flat moment vectors (the arrays' elements in order) and step = -learning
// rate, bc1 = 1 - b1^t, bc2 = 1 - b2^t and the gradient's norm computed by the caller (the
// "scalars" argument). Arguments: scalars, mu, nu, then the N gradient arrays, then the N
// parameter arrays; results: mu, nu, the N parameter arrays (aliased to their inputs).
// XLA compiles the same update as a few small fusions per array (decay, the concatenation into
// the flat vector, the split back and the addition to each array), ~630 of the 2,121 fusions of
// the full-size online-KD step, and reads and writes each element several times.
struct AdamConstants {
  float b1, b2, one_minus_b1, one_minus_b2, eps, eps_root, weight_decay, max_norm;
};

void AdamPiece(const AdamConstants& k, const float* scalars, const float* g, float* p, float* mu,
               float* nu, int64_t n) {
  const float step = scalars[0], bc1 = scalars[1], bc2 = scalars[2], norm = scalars[3];
  const bool clip = k.max_norm > 0 && !(norm < k.max_norm);
  for (int64_t e = 0; e < n; ++e) {
    float grad = clip ? (g[e] / norm) * k.max_norm : g[e];
    if (k.weight_decay != 0) grad = grad + k.weight_decay * p[e];
    const float m = k.one_minus_b1 * grad + k.b1 * mu[e];
    const float v = k.one_minus_b2 * (grad * grad) + k.b2 * nu[e];
    mu[e] = m;
    nu[e] = v;
    p[e] = p[e] + step * ((m / bc1) / (std::sqrt(v / bc2 + k.eps_root) + k.eps));
  }
}

ffi::Error AdamImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32, 1> scalars,
                    ffi::Buffer<ffi::F32, 1> mu_in, ffi::Buffer<ffi::F32, 1> nu_in,
                    ffi::RemainingArgs args, ffi::ResultBuffer<ffi::F32, 1> mu,
                    ffi::ResultBuffer<ffi::F32, 1> nu, ffi::RemainingRets rets, float b1, float b2,
                    float one_minus_b1, float one_minus_b2, float eps, float eps_root,
                    float weight_decay, float max_norm) {
  constexpr int64_t kPiece = 1 << 16;
  const int64_t n = static_cast<int64_t>(mu_in.element_count());
  const size_t arrays = args.size() / 2;
  if (scalars.element_count() != 4 || args.size() % 2 != 0 || rets.size() != arrays ||
      nu_in.element_count() != static_cast<size_t>(n) ||
      mu->element_count() != static_cast<size_t>(n) || nu->element_count() != static_cast<size_t>(n))
    return ffi::Error::InvalidArgument(
        "eegkd adam: takes scalars (4,), mu, nu (n,), N gradients and N parameters, and returns "
        "mu, nu and N parameters");
  struct Piece {
    const float* g;
    const float* p_in;
    float* p;
    int64_t first, n;  // first: the piece's offset in the flat moments
  };
  std::vector<Piece> pieces;
  int64_t offset = 0;
  for (size_t i = 0; i < arrays; ++i) {
    auto g = args.get<ffi::AnyBuffer>(i);
    auto p_in = args.get<ffi::AnyBuffer>(arrays + i);
    auto p = rets.get<ffi::AnyBuffer>(i);
    if (g.has_error()) return g.error();
    if (p_in.has_error()) return p_in.error();
    if (p.has_error()) return p.error();
    const size_t size = g->element_count();
    if (g->element_type() != ffi::F32 || p_in->element_type() != ffi::F32 ||
        (*p)->element_type() != ffi::F32 || p_in->element_count() != size ||
        (*p)->element_count() != size)
      return ffi::Error::InvalidArgument("eegkd adam: gradient, parameter and result " +
                                         std::to_string(i) + " differ in size or are not float32");
    for (int64_t first = 0; first < static_cast<int64_t>(size); first += kPiece)
      pieces.push_back({g->typed_data<float>() + first, p_in->typed_data<float>() + first,
                        (*p)->typed_data<float>() + first, offset + first,
                        std::min<int64_t>(kPiece, static_cast<int64_t>(size) - first)});
    offset += static_cast<int64_t>(size);
  }
  if (offset != n)
    return ffi::Error::InvalidArgument("eegkd adam: the moments have " + std::to_string(n) +
                                       " elements, the arrays " + std::to_string(offset));
  const AdamConstants k{b1, b2, one_minus_b1, one_minus_b2, eps, eps_root, weight_decay, max_norm};
  const float* sc = scalars.typed_data();
  const float* mu_read = mu_in.typed_data();
  const float* nu_read = nu_in.typed_data();
  float* mu_out = mu->typed_data();
  float* nu_out = nu->typed_data();
  ParallelFor(pool, static_cast<int64_t>(pieces.size()), [&](int64_t i) {
    const Piece& piece = pieces[i];
    // Results normally alias their inputs (the call donates them); copy where they do not.
    if (piece.p != piece.p_in) std::memcpy(piece.p, piece.p_in, piece.n * sizeof(float));
    if (mu_out != mu_read) std::memcpy(mu_out + piece.first, mu_read + piece.first, piece.n * 4);
    if (nu_out != nu_read) std::memcpy(nu_out + piece.first, nu_read + piece.first, piece.n * 4);
    AdamPiece(k, sc, piece.g, piece.p, mu_out + piece.first, nu_out + piece.first, piece.n);
  });
  return ffi::Error::Success();
}

// Aliases: a comma inside a template argument list would split the macro arguments below.
using Rank0 = ffi::Buffer<ffi::F32, 0>;
using Rank1 = ffi::Buffer<ffi::F32, 1>;
using Rank2 = ffi::Buffer<ffi::F32, 2>;
using Rank3 = ffi::Buffer<ffi::F32, 3>;

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
                                  .Arg<Rank1>()
                                  .RemainingArgs()
                                  .Ret<Rank3>()
                                  .Ret<Rank2>()
                                  .Attr<int64_t>("left")
                                  .Attr<bool>("affine"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EegkdConv1dWeightGrad, Conv1dWeightGradImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank3>()
                                  .RemainingArgs()
                                  .Ret<Rank3>()
                                  .Ret<Rank1>()
                                  .Attr<int64_t>("left")
                                  .Attr<bool>("affine"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(EegkdSumOfSquares, SumOfSquaresImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .RemainingArgs()
                                  .Ret<Rank0>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(EegkdAdam, AdamImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<Rank1>()
                                  .Arg<Rank1>()
                                  .Arg<Rank1>()
                                  .RemainingArgs()
                                  .Ret<Rank1>()
                                  .Ret<Rank1>()
                                  .RemainingRets()
                                  .Attr<float>("b1")
                                  .Attr<float>("b2")
                                  .Attr<float>("one_minus_b1")
                                  .Attr<float>("one_minus_b2")
                                  .Attr<float>("eps")
                                  .Attr<float>("eps_root")
                                  .Attr<float>("weight_decay")
                                  .Attr<float>("max_norm"));
