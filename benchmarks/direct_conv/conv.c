// A direct 1-D "same" convolution for thin channels, written to measure whether a hand-written CPU
// kernel could beat XLA:CPU's convolution at U-Sleep's shapes (see bench.py beside this file).
//
//   y[b, f, t] = sum_{c, j} w[f, c, j] * x[b, c, t + j - left],  x outside [0, T) read as zero
//
// Layout NCW (time contiguous): x (B, C, T), w (F, C, K), y (B, F, T). Each batch element's input
// is copied once into a zero-padded scratch row per channel; outputs are computed in blocks of
// FB output channels x TV vectors of 16 samples held in registers, so each input vector loaded is
// used FB times and each broadcast weight TV times. GCC's vector extension keeps it portable: a
// 16-float vector is one AVX-512 register, two AVX2 registers, or four SSE ones.
#include <stdlib.h>
#include <string.h>

typedef float vf __attribute__((vector_size(64)));
#define LANES 16
#define TV 4
#define FB_MAX 6

static inline vf load(const float* p) { vf v; memcpy(&v, p, sizeof v); return v; }

static inline __attribute__((always_inline)) void block(
    const float* xp, int C, int Tp, const float* w, int K, int f0, const int fb_n, float* y,
    int T, int t0) {
  vf acc[FB_MAX][TV];
  for (int fb = 0; fb < FB_MAX; fb++)
    for (int v = 0; v < TV; v++) acc[fb][v] = (vf){0};
  for (int c = 0; c < C; c++) {
    const float* xc = xp + (size_t)c * Tp + t0;
    for (int j = 0; j < K; j++) {
      vf xv[TV];
      for (int v = 0; v < TV; v++) xv[v] = load(xc + j + LANES * v);
      for (int fb = 0; fb < fb_n; fb++) {
        float wj = w[((size_t)(f0 + fb) * C + c) * K + j];
        for (int v = 0; v < TV; v++) acc[fb][v] += wj * xv[v];
      }
    }
  }
  for (int fb = 0; fb < fb_n; fb++) {
    float* yf = y + (size_t)(f0 + fb) * T + t0;
    for (int v = 0; v < TV; v++) {
      int n = T - t0 - LANES * v;
      if (n >= LANES) memcpy(yf + LANES * v, &acc[fb][v], sizeof(vf));
      else if (n > 0) memcpy(yf + LANES * v, &acc[fb][v], (size_t)n * sizeof(float));
    }
  }
}

// Returns 0, or 1 if the scratch row could not be allocated.
int conv_ncw(const float* x, const float* w, float* y, int B, int C, int T, int F, int K,
             int left) {
  int Tp = T + K + LANES * TV;  // left padding, right padding and room to over-read
  float* xp = malloc((size_t)C * Tp * sizeof(float));
  if (!xp) return 1;
  for (int b = 0; b < B; b++) {
    memset(xp, 0, (size_t)C * Tp * sizeof(float));
    for (int c = 0; c < C; c++)
      memcpy(xp + (size_t)c * Tp + left, x + ((size_t)b * C + c) * T, (size_t)T * sizeof(float));
    float* yb = y + (size_t)b * F * T;
    for (int f0 = 0; f0 < F; f0 += FB_MAX) {
      int fb_n = F - f0 < FB_MAX ? F - f0 : FB_MAX;
      for (int t0 = 0; t0 < T; t0 += LANES * TV) {
        switch (fb_n) {  // constant block sizes, so the register blocks are unrolled
          case 1: block(xp, C, Tp, w, K, f0, 1, yb, T, t0); break;
          case 2: block(xp, C, Tp, w, K, f0, 2, yb, T, t0); break;
          case 3: block(xp, C, Tp, w, K, f0, 3, yb, T, t0); break;
          case 4: block(xp, C, Tp, w, K, f0, 4, yb, T, t0); break;
          case 5: block(xp, C, Tp, w, K, f0, 5, yb, T, t0); break;
          default: block(xp, C, Tp, w, K, f0, FB_MAX, yb, T, t0); break;
        }
      }
    }
  }
  free(xp);
  return 0;
}
