// k x k convolutions (stride 1 or 2) on the CPU, called from XLA through its FFI
// (rebll_jax/models/cpu_kernels.py builds, loads and routes to them).
//
//   RebllConvForward:    y[n, oy, ox, o] = sum_{ky, kx, c} x[n, s*oy+ky-pt, s*ox+kx-pl, c] w[ky, kx, c, o]
//                        (each image copied into a zero-padded buffer first)
//   RebllConvFilterGrad: dw[ky, kx, c, o] = sum_{n, oy, ox} x[n, s*oy+ky-pt, s*ox+kx-pl, c] g[n, oy, ox, o]
//
// NHWC activations, HWIO filters, float32, zero padding (x outside the map is
// 0). Output channels in multiples of 16: one 16-float AVX-512 vector, or
// two 8-float AVX2 ones (GCC vector extension, `vec`), per 16 channels. Each
// kernel keeps a block of accumulators in registers and streams the operand
// it broadcasts from: the forward a row of PB output positions x COV channel
// vectors, summed over chunks of 64 input channels (a chunk's filter stays in
// L2), the filter gradient CIB input channels x COV vectors over every
// output position (with few input channels, an RGB stem: JB consecutive
// (kx, c) taps of a padded input row instead). The batch is split over
// `threads` std::threads; partial
// filter gradients are summed in a fixed order (deterministic results).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// One vector of kLanes floats: an AVX-512 register, or on CPUs without
// AVX-512 an AVX2 one (8 floats; 16 registers instead of 32, so the
// dispatchers below pick smaller register blocks there).
#if defined(__AVX512F__)
constexpr int kLanes = 16;
#else
constexpr int kLanes = 8;
#endif
typedef float vec __attribute__((vector_size(4 * kLanes), aligned(4)));

struct Shape {
  int64_t n, h, w, ci, oh, ow, co, kh, kw, pt, pl, sh, sw;
};

// Unaligned vector moves (`vec` is 4-byte aligned). Not memcpy: for AVX2,
// GCC expands a 32-byte memcpy in 16-byte pieces through the stack, which
// kept every accumulator in memory (10x slower).
inline vec Load(const float* p) { return *reinterpret_cast<const vec*>(p); }

inline void Store(float* p, const vec& v) { *reinterpret_cast<vec*>(p) = v; }

// A block of NB x COV accumulator vectors: rows `row` floats apart.
template <int NB, int COV>
inline void LoadBlock(vec (&acc)[NB][COV], const float* p, int64_t row) {
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < COV; ++j) acc[i][j] = Load(p + i * row + kLanes * j);
}

template <int NB, int COV>
inline void StoreBlock(const vec (&acc)[NB][COV], float* p, int64_t row) {
  for (int i = 0; i < NB; ++i)
    for (int j = 0; j < COV; ++j) Store(p + i * row + kLanes * j, acc[i][j]);
}

// ---------------------------------------------------------------- forward --

// y for PB consecutive output positions of one row, kLanes * COV channels from
// o0, accumulated over the input channels [c0, c0 + CC) (CC: compile-time
// chunk length, 0 = cn); `first`: the chunk starts the sum (else y holds the
// sum over the earlier chunks). The input is padded already: every tap is
// inside the map. S: the stride, so that the PB positions' broadcast
// addresses are immediates, not PB index registers.
template <int PB, int COV, int CC, int S>
inline void ForwardBlock(const float* xb, const float* w, float* yr,
                         const Shape& s, int64_t oy, int64_t ox0, int64_t o0,
                         int64_t c0, int64_t cn, bool first) {
  const int64_t cc = CC ? CC : cn;
  vec acc[PB][COV];
  float* y0 = yr + ox0 * s.co + o0;
  if (first) {
    for (int p = 0; p < PB; ++p)
      for (int j = 0; j < COV; ++j) acc[p][j] = vec{};
  } else {
    LoadBlock(acc, y0, s.co);
  }
  for (int64_t ky = 0; ky < s.kh; ++ky) {
    for (int64_t kx = 0; kx < s.kw; ++kx) {
      const float* xr = xb + ((oy * S + ky) * s.w + ox0 * S + kx) * s.ci + c0;
      const float* wt = w + ((ky * s.kw + kx) * s.ci + c0) * s.co + o0;
      for (int64_t c = 0; c < cc; ++c) {
        vec wv[COV];
        for (int j = 0; j < COV; ++j) wv[j] = Load(wt + c * s.co + kLanes * j);
        for (int p = 0; p < PB; ++p) {
          const float xs = xr[p * S * s.ci + c];
          for (int j = 0; j < COV; ++j) acc[p][j] += xs * wv[j];
        }
      }
    }
  }
  StoreBlock(acc, y0, s.co);
}

// Positions [ox, ow) of a row: blocks of PB, the rest in halving blocks.
template <int PB, int COV, int CC, int S>
inline void ForwardRow(const float* xb, const float* w, float* yr,
                       const Shape& s, int64_t oy, int64_t ox, int64_t o0,
                       int64_t c0, int64_t cn, bool first) {
  for (; ox + PB <= s.ow; ox += PB)
    ForwardBlock<PB, COV, CC, S>(xb, w, yr, s, oy, ox, o0, c0, cn, first);
  if constexpr (PB > 1) {
    if (ox < s.ow)
      ForwardRow<PB / 2, COV, CC, S>(xb, w, yr, s, oy, ox, o0, c0, cn, first);
  }
}

// Input channels per pass: a chunk's filter (k*k x kForwardChunk x 16*COV
// floats, 147 KB for a 3x3 at 64 x 64) stays in the L2 cache while the
// image's rows stream past it.
constexpr int64_t kForwardChunk = 64;

// A "valid" correlation of one padded image xb [h, w, ci] at stride S into
// yb [oh, ow, co] (s.pt = s.pl = 0).
template <int PB, int COV, int CC, int S>
void ForwardImage(const float* xb, const float* w, float* yb, const Shape& s) {
  for (int64_t o0 = 0; o0 < s.co; o0 += kLanes * COV) {
    for (int64_t c0 = 0; c0 < s.ci; c0 += kForwardChunk) {
      const int64_t cn = std::min(kForwardChunk, s.ci - c0);
      for (int64_t oy = 0; oy < s.oh; ++oy)
        ForwardRow<PB, COV, CC, S>(xb, w, yb + oy * s.ow * s.co, s, oy, 0, o0,
                                   c0, cn, c0 == 0);
    }
  }
}

template <int PB, int COV, int S>
void ForwardAnyCi(const float* xb, const float* w, float* yb, const Shape& s) {
  if (s.ci % kForwardChunk == 0)
    return ForwardImage<PB, COV, kForwardChunk, S>(xb, w, yb, s);
  switch (s.ci) {
    case 16: return ForwardImage<PB, COV, 16, S>(xb, w, yb, s);
    case 32: return ForwardImage<PB, COV, 32, S>(xb, w, yb, s);
    default: return ForwardImage<PB, COV, 0, S>(xb, w, yb, s);
  }
}

// 64 output channels: 7 positions x 4 vectors (28 accumulators) where rows
// are multiples of 7 (ResNets at 224 px: 56, 28, 14, 7, and a 112 stem),
// else 4 x 4 (a row of 8 would leave 7 + 1).
// With AVX2 (16 registers, no broadcast operands): 6 positions x 16
// channels (12 accumulators, 2 filter vectors, 1 broadcast).
template <int S>
void ForwardAnyCo(const float* xb, const float* w, float* yb, const Shape& s) {
#if defined(__AVX512F__)
  if (s.co % 64 == 0 && s.ow % 7 == 0) ForwardAnyCi<7, 4, S>(xb, w, yb, s);
  else if (s.co % 64 == 0) ForwardAnyCi<4, 4, S>(xb, w, yb, s);
  else if (s.co % 32 == 0) ForwardAnyCi<8, 2, S>(xb, w, yb, s);
  else ForwardAnyCi<16, 1, S>(xb, w, yb, s);
#else
  ForwardAnyCi<6, 2, S>(xb, w, yb, s);
#endif
}

// ---------------------------------------------------------- filter grad --

// The first output index o >= 0 with o * stride >= offset (offset may be
// negative or zero: 0).
inline int64_t FirstInside(int64_t offset, int64_t stride) {
  return offset <= 0 ? 0 : (offset + stride - 1) / stride;
}

// Output rows per pass, counted over the batch (row r = b * oh + oy): the
// chunk's x and g rows stay in the L2 cache while every (tap, channel
// block) pass reads them. Whole images when one fits, else a part of one
// (a 56 x 56 map of 64 + 64 channels is 1.6 MB).
constexpr int64_t kChunkBytes = 256 << 10;

inline int64_t ChunkRows(const Shape& s) {
  const int64_t image_bytes = 4 * (s.h * s.w * s.ci + s.oh * s.ow * s.co);
  if (image_bytes <= kChunkBytes) return kChunkBytes / image_bytes * s.oh;
  const int64_t row_bytes = 4 * (s.sh * s.w * s.ci + s.ow * s.co);
  return std::max<int64_t>(1, kChunkBytes / row_bytes);
}

// The filter gradient's inner loop over `count` output positions:
// acc[i][j] += xp[i] * (kLanes cotangent channels j of gp), xp and gp advancing
// by x_step and g_step floats per position.
template <int NB, int COV>
inline void AccumulatePositions(vec (&acc)[NB][COV], const float* xp,
                                int64_t x_step, const float* gp,
                                int64_t g_step, int64_t count) {
  for (int64_t p = 0; p < count; ++p, xp += x_step, gp += g_step) {
    vec gv[COV];
    for (int j = 0; j < COV; ++j) gv[j] = Load(gp + kLanes * j);
    for (int i = 0; i < NB; ++i) {
      const float xs = xp[i];
      for (int j = 0; j < COV; ++j) acc[i][j] += xs * gv[j];
    }
  }
}

template <int CIB, int COV>
void FilterGrad(const float* x, const float* g, float* dw, const Shape& s,
                int64_t b0, int64_t b1) {
  const int64_t chunk = ChunkRows(s);
  for (int64_t r0 = b0 * s.oh; r0 < b1 * s.oh; r0 += chunk) {
    const int64_t r1 = std::min(b1 * s.oh, r0 + chunk);
    for (int64_t ky = 0; ky < s.kh; ++ky) {
      // Output rows / columns whose input row / column is inside the map.
      const int64_t oy0 = FirstInside(s.pt - ky, s.sh);
      const int64_t oy1 = std::min(s.oh, FirstInside(s.h + s.pt - ky, s.sh));
      for (int64_t kx = 0; kx < s.kw; ++kx) {
        const int64_t ox0 = FirstInside(s.pl - kx, s.sw);
        const int64_t ox1 = std::min(s.ow, FirstInside(s.w + s.pl - kx, s.sw));
        float* dwt = dw + (ky * s.kw + kx) * s.ci * s.co;
        for (int64_t c0 = 0; c0 < s.ci; c0 += CIB) {
          for (int64_t o0 = 0; o0 < s.co; o0 += kLanes * COV) {
            vec acc[CIB][COV];
            LoadBlock(acc, dwt + c0 * s.co + o0, s.co);
            for (int64_t r = r0; r < r1; ++r) {
              const int64_t b = r / s.oh, oy = r - b * s.oh;
              if (oy < oy0 || oy >= oy1) continue;
              const float* xr =
                  x + ((b * s.h + oy * s.sh + ky - s.pt) * s.w) * s.ci + c0;
              AccumulatePositions(acc, xr + (ox0 * s.sw + kx - s.pl) * s.ci,
                                  s.sw * s.ci, g + (r * s.ow + ox0) * s.co + o0,
                                  s.co, ox1 - ox0);
            }
            StoreBlock(acc, dwt + c0 * s.co + o0, s.co);
          }
        }
      }
    }
  }
}

// The filter gradient when the input is padded already (every tap inside
// the map) and has few channels (an RGB stem, where FilterGrad's channel
// blocks would be one channel wide). For a fixed ky the taps (kx, c) of an
// output position are kw * ci consecutive floats of the input row, and the
// filter's (kx, c) rows are consecutive too: blocks of JB taps share each
// loaded cotangent vector. JB divides kw * ci (the caller's choice).
template <int JB, int COV>
void FilterGradRowTaps(const float* x, const float* g, float* dw,
                       const Shape& s, int64_t b0, int64_t b1) {
  const int64_t taps = s.kw * s.ci;
  const int64_t chunk = ChunkRows(s);
  for (int64_t r0 = b0 * s.oh; r0 < b1 * s.oh; r0 += chunk) {
    const int64_t r1 = std::min(b1 * s.oh, r0 + chunk);
    for (int64_t ky = 0; ky < s.kh; ++ky) {
      float* dwr = dw + ky * taps * s.co;
      for (int64_t j0 = 0; j0 < taps; j0 += JB) {
        for (int64_t o0 = 0; o0 < s.co; o0 += kLanes * COV) {
          vec acc[JB][COV];
          LoadBlock(acc, dwr + j0 * s.co + o0, s.co);
          for (int64_t r = r0; r < r1; ++r) {
            const int64_t b = r / s.oh, oy = r - b * s.oh;
            AccumulatePositions(
                acc, x + ((b * s.h + oy * s.sh + ky) * s.w) * s.ci + j0,
                s.sw * s.ci, g + r * s.ow * s.co + o0, s.co, s.ow);
          }
          StoreBlock(acc, dwr + j0 * s.co + o0, s.co);
        }
      }
    }
  }
}

template <int COV>
void FilterGradRowTapsAnyJ(const float* x, const float* g, float* dw,
                           const Shape& s, int64_t b0, int64_t b1) {
  const int64_t taps = s.kw * s.ci;
  if constexpr (kLanes == 16) {  // 7 x COV accumulators: 32 registers
    if (taps % 7 == 0) return FilterGradRowTaps<7, COV>(x, g, dw, s, b0, b1);
  }
  if (taps % 6 == 0) return FilterGradRowTaps<6, COV>(x, g, dw, s, b0, b1);
  if (taps % 4 == 0) return FilterGradRowTaps<4, COV>(x, g, dw, s, b0, b1);
  if (taps % 3 == 0) return FilterGradRowTaps<3, COV>(x, g, dw, s, b0, b1);
  if (taps % 2 == 0) return FilterGradRowTaps<2, COV>(x, g, dw, s, b0, b1);
  return FilterGradRowTaps<1, COV>(x, g, dw, s, b0, b1);
}

// --------------------------------------------------------------- driver --

// Runs body(b0, b1, t) on `threads` contiguous batch ranges (t = 0 inline).
template <typename Body>
void OverBatch(int64_t n, int64_t threads, Body body) {
  threads = std::max<int64_t>(1, std::min(threads, n));
  std::vector<std::thread> pool;
  for (int64_t t = 1; t < threads; ++t)
    pool.emplace_back(body, n * t / threads, n * (t + 1) / threads, t);
  body(0, n / threads, 0);
  for (auto& th : pool) th.join();
}

ffi::Error CheckRank4(std::initializer_list<size_t> ranks) {
  for (size_t r : ranks)
    if (r != 4) return ffi::Error::InvalidArgument("rank-4 operands expected");
  return ffi::Error::Success();
}

ffi::Error ConvForwardImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y, int64_t stride,
                           int64_t pad_top, int64_t pad_bottom,
                           int64_t pad_left, int64_t pad_right,
                           int64_t threads) {
  auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (auto e = CheckRank4({xd.size(), wd.size(), yd.size()}); e.failure()) return e;
  if (std::min({pad_top, pad_bottom, pad_left, pad_right}) < 0)
    return ffi::Error::InvalidArgument("negative padding");
  const int64_t h = xd[1], wi = xd[2];
  // The shape of the padded image the kernels see.
  const Shape s{xd[0], h + pad_top + pad_bottom, wi + pad_left + pad_right,
                xd[3], yd[1], yd[2], yd[3], wd[0], wd[1], 0, 0, stride, stride};
  if (s.co % 16 != 0) return ffi::Error::InvalidArgument("cout % 16 != 0");
  if (stride != 1 && stride != 2)
    return ffi::Error::InvalidArgument("stride must be 1 or 2");
  if (s.oh != (s.h - s.kh) / stride + 1 || s.ow != (s.w - s.kw) / stride + 1)
    return ffi::Error::InvalidArgument("output is not the valid correlation");
  const bool padded = s.h != h || s.w != wi;
  const float* xs = x.typed_data();
  const float* ws = w.typed_data();
  float* ys = y->typed_data();
  OverBatch(s.n, threads, [&](int64_t b0, int64_t b1, int64_t) {
    // Each image is copied into the inside of a zeroed padded buffer (its
    // border is never written): the padded map stays in this core's cache
    // instead of making XLA write a padded copy of the whole batch.
    std::vector<float> image(padded ? s.h * s.w * s.ci : 0, 0.0f);
    for (int64_t b = b0; b < b1; ++b) {
      const float* xb = xs + b * h * wi * s.ci;
      if (padded) {
        for (int64_t r = 0; r < h; ++r)
          std::memcpy(image.data() + ((r + pad_top) * s.w + pad_left) * s.ci,
                      xb + r * wi * s.ci, sizeof(float) * wi * s.ci);
        xb = image.data();
      }
      float* yb = ys + b * s.oh * s.ow * s.co;
      if (stride == 1) ForwardAnyCo<1>(xb, ws, yb, s);
      else ForwardAnyCo<2>(xb, ws, yb, s);
    }
  });
  return ffi::Error::Success();
}

ffi::Error FilterGradImpl(ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> g,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t pad_top,
                          int64_t pad_left, int64_t stride, int64_t threads) {
  auto xd = x.dimensions(), gd = g.dimensions(), wd = dw->dimensions();
  if (auto e = CheckRank4({xd.size(), gd.size(), wd.size()}); e.failure()) return e;
  const Shape s{xd[0], xd[1], xd[2], xd[3], gd[1], gd[2], gd[3],
                wd[0], wd[1], pad_top, pad_left, stride, stride};
  if (stride < 1) return ffi::Error::InvalidArgument("stride must be >= 1");
  if (s.co % 16 != 0) return ffi::Error::InvalidArgument("cout % 16 != 0");
  const int64_t size = s.kh * s.kw * s.ci * s.co;
  // Few channels and a padded input (every tap inside): whole-row tap blocks.
  const bool row_taps = s.ci % 4 != 0 && pad_top == 0 && pad_left == 0 &&
                        (s.oh - 1) * stride + s.kh <= s.h &&
                        (s.ow - 1) * stride + s.kw <= s.w;
  threads = std::max<int64_t>(1, std::min(threads, s.n));
  // Thread t accumulates into its own buffer (t = 0: the output).
  std::vector<float> partial((threads - 1) * size, 0.0f);
  float* out = dw->typed_data();
  std::memset(out, 0, sizeof(float) * size);
  const float* xs = x.typed_data();
  const float* gs = g.typed_data();
  OverBatch(s.n, threads, [&](int64_t b0, int64_t b1, int64_t t) {
    float* acc = t == 0 ? out : partial.data() + (t - 1) * size;
#if defined(__AVX512F__)
    if (row_taps) {
      if (s.co % 64 == 0) FilterGradRowTapsAnyJ<4>(xs, gs, acc, s, b0, b1);
      else if (s.co % 32 == 0) FilterGradRowTapsAnyJ<2>(xs, gs, acc, s, b0, b1);
      else FilterGradRowTapsAnyJ<1>(xs, gs, acc, s, b0, b1);
    } else if (s.co % 64 == 0 && s.ci % 4 == 0) FilterGrad<4, 4>(xs, gs, acc, s, b0, b1);
    else if (s.co % 32 == 0 && s.ci % 8 == 0) FilterGrad<8, 2>(xs, gs, acc, s, b0, b1);
    else if (s.ci % 16 == 0) FilterGrad<16, 1>(xs, gs, acc, s, b0, b1);
    else if (s.ci % 4 == 0) FilterGrad<4, 1>(xs, gs, acc, s, b0, b1);
    else FilterGrad<1, 1>(xs, gs, acc, s, b0, b1);
#else
    // AVX2: blocks of 16 output channels (2 vectors) and at most 6 rows.
    if (row_taps) FilterGradRowTapsAnyJ<2>(xs, gs, acc, s, b0, b1);
    else if (s.ci % 6 == 0) FilterGrad<6, 2>(xs, gs, acc, s, b0, b1);
    else if (s.ci % 4 == 0) FilterGrad<4, 2>(xs, gs, acc, s, b0, b1);
    else FilterGrad<1, 2>(xs, gs, acc, s, b0, b1);
#endif
  });
  for (int64_t t = 1; t < threads; ++t)
    for (int64_t i = 0; i < size; ++i) out[i] += partial[(t - 1) * size + i];
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(RebllConvForward, ConvForwardImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_bottom")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("pad_right")
                                  .Attr<int64_t>("threads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(RebllConvFilterGrad, FilterGradImpl,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("threads"));
