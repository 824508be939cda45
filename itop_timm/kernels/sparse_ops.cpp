// itop_timm's CPU kernels: 2-D convolution (and linear layers, as 1x1 convolutions over a 1x1 image)
// computed over a layer's active weights only, forward and backward, fp32, OpenMP threads.
//
// Layout: activations are "batch innermost", so every inner loop is a contiguous run over the batch
// (N) that the compiler keeps in vector registers:
//   x  [C][H][W][N]     the input, and gx, its gradient;
//   y  [O][OH][OW][N]   the output, and gy, its gradient.
// Padding is never stored: each tap's reads are limited to the image (per tap, never per entry).
// The weight stays dense, [O][C][K][K]; its active entries are listed twice, grouped by tap so that no
// inner loop branches on an entry (a random mask would make such branches unpredictable):
//   by output channel, then tap, then input channel:  out_ptr[O * K * K + 1]; per entry out_flat
//                       (index into the dense weight), out_ch (input channel) -> forward, weight gradient;
//   by input channel, then tap, then output channel:  in_ptr[C * K * K + 1]; per entry in_flat, in_o
//                       (output channel)                                       -> input gradient.
// Geometry g[] = {N, C, H, W, O, OH, OW, stride, pad, K}. Square kernels, zero padding, groups = 1.
// Every sum runs in a fixed order, so results do not depend on the number of threads.
// Plain C ABI, no dependency on torch: loaded with ctypes (see build.py).

#include <cstdint>
#include <type_traits>

using i64 = int64_t;
using i32 = int32_t;

namespace {

struct Geometry {
  i64 N, C, H, W, O, OH, OW, stride, pad, K;
  explicit Geometry(const i64* g)
      : N(g[0]), C(g[1]), H(g[2]), W(g[3]), O(g[4]), OH(g[5]), OW(g[6]), stride(g[7]), pad(g[8]), K(g[9]) {}
};

// Channels per work item: an item is one spatial position and this many channels, so the
// neighbourhood a position reads stays in cache while every channel uses it.
constexpr i64 kChannelBlock = 16;
inline bool outside(i64 i, i64 size) { return static_cast<uint64_t>(i) >= static_cast<uint64_t>(size); }

// ceil(a / stride) for a > 0; S: the stride when it is 1 or 2 (no division), else 0 (read `stride`).
template <int S>
inline i64 div_up(i64 a, i64 stride) {
  return S == 1 ? a : S == 2 ? (a + 1) >> 1 : (a + stride - 1) / stride;
}

// The output indices o in [first, end) whose window reads input index o * stride + t - pad inside
// [0, size): o * stride >= pad - t and o * stride < size + pad - t.
template <int S>
inline i64 first_output(i64 t, i64 pad, i64 stride) {
  const i64 lo = pad - t;
  return lo <= 0 ? 0 : div_up<S>(lo, stride);
}
template <int S>
inline i64 end_output(i64 t, i64 pad, i64 stride, i64 size, i64 count) {
  const i64 hi = size + pad - t;
  if (hi <= 0) return 0;
  const i64 end = div_up<S>(hi, stride);
  return end < count ? end : count;
}

// B consecutive batch elements held in registers: B / 16 vectors of 16 floats (GCC/Clang vector
// extensions; the compiler maps them to AVX-512, AVX2 or SSE registers), or one float for B = 1.
typedef float f16 __attribute__((vector_size(64), aligned(4), may_alias));

template <int B>
struct Lanes {
  static constexpr int V = B / 16;
  f16 r[V];
  inline void fill(float s) {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) r[j] = f16{} + s;
  }
  inline void axpy(float a, const float* p) {  // r += a * p[0:B]
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) r[j] += a * *reinterpret_cast<const f16*>(p + 16 * j);
  }
  inline void load(const float* p) {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) r[j] = *reinterpret_cast<const f16*>(p + 16 * j);
  }
  inline void fma(const Lanes& a, const float* b) {  // r += a * b[0:B]
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) r[j] += a.r[j] * *reinterpret_cast<const f16*>(b + 16 * j);
  }
  inline void store(float* p) const {
#pragma GCC unroll 16
    for (int j = 0; j < V; ++j) *reinterpret_cast<f16*>(p + 16 * j) = r[j];
  }
  inline float sum() const {  // a fixed tree: the same order every time
    f16 t = r[0];
#pragma GCC unroll 16
    for (int j = 1; j < V; ++j) t += r[j];
    float lanes[16];
    __builtin_memcpy(lanes, &t, sizeof lanes);
    for (int width = 8; width > 0; width /= 2)
      for (int i = 0; i < width; ++i) lanes[i] += lanes[i + width];
    return lanes[0];
  }
};

template <>
struct Lanes<1> {
  float r;
  inline void fill(float s) { r = s; }
  inline void axpy(float a, const float* p) { r += a * p[0]; }
  inline void load(const float* p) { r = p[0]; }
  inline void fma(const Lanes& a, const float* b) { r += a.r * b[0]; }
  inline void store(float* p) const { p[0] = r; }
  inline float sum() const { return r; }
};

// Runs Tile<B>::run(n0, ...) over [0, N) in blocks of 128, 64, 16, then 1 batch elements.
template <template <int> class Tile, class... Args>
inline void over_batch(i64 N, Args&&... args) {
  i64 n0 = 0;
  for (; n0 + 128 <= N; n0 += 128) Tile<128>::run(n0, args...);
  for (; n0 + 64 <= N; n0 += 64) Tile<64>::run(n0, args...);
  for (; n0 + 16 <= N; n0 += 16) Tile<16>::run(n0, args...);
  for (; n0 < N; ++n0) Tile<1>::run(n0, args...);
}

// y[o, oh, ow, n0:n0+B] = bias + sum over the taps inside the image, and the row's entries of each tap,
// of w * x[c, oh*s + kh - pad, ow*s + kw - pad, n0:n0+B].
template <int B>
struct ForwardTile {
  static void run(i64 n0, const Geometry& g, const float* __restrict x, const float* __restrict w,
                  float* __restrict y, float bias, i64 o, i64 oh, i64 ow, const i64* out_ptr,
                  const i64* out_flat, const i32* out_ch) {
    Lanes<B> acc;
    acc.fill(bias);
    const i64 plane = g.H * g.W * g.N;
    const i64* taps = out_ptr + o * g.K * g.K;
    for (i64 kh = 0; kh < g.K; ++kh) {
      const i64 ih = oh * g.stride + kh - g.pad;
      if (outside(ih, g.H)) continue;  // the tap reads padding here
      for (i64 kw = 0; kw < g.K; ++kw) {
        const i64 iw = ow * g.stride + kw - g.pad;
        if (outside(iw, g.W)) continue;
        const float* base = x + (ih * g.W + iw) * g.N + n0;
        const i64 t = kh * g.K + kw;
        for (i64 k = taps[t]; k < taps[t + 1]; ++k) acc.axpy(w[out_flat[k]], base + out_ch[k] * plane);
      }
    }
    acc.store(y + ((o * g.OH + oh) * g.OW + ow) * g.N + n0);
  }
};

// The output index o reading input index i through kernel offset t: o * stride + t = i + pad; -1 if none.
// S: the stride when it is 1 or 2 (shifts instead of divisions), else 0.
template <int S>
inline i64 reader(i64 i, i64 t, const Geometry& g, i64 count) {
  i64 o = i + g.pad - t;
  if (o < 0) return -1;
  if (S == 2) {
    if (o & 1) return -1;
    o >>= 1;
  } else if (S != 1) {
    if (o % g.stride) return -1;
    o /= g.stride;
  }
  return o < count ? o : -1;
}

// gx[c, ih, iw, n0:n0+B] = sum over the taps (kh, kw) through which an output reads x[c, ih, iw], and
// the column's entries of each tap, of w * gy[o, oh, ow, n0:n0+B].
template <int S>
struct InputGradTileFor {
  template <int B>
  struct Tile {
    static void run(i64 n0, const Geometry& g, const float* __restrict gy, const float* __restrict w,
                    float* __restrict gx, i64 c, i64 ih, i64 iw, const i64* in_ptr, const i64* in_flat,
                    const i32* in_o) {
      Lanes<B> acc;
      acc.fill(0.0f);
      const i64 plane = g.OH * g.OW * g.N;
      const i64* taps = in_ptr + c * g.K * g.K;
      for (i64 kh = 0; kh < g.K; ++kh) {
        const i64 oh = reader<S>(ih, kh, g, g.OH);
        if (oh < 0) continue;
        for (i64 kw = 0; kw < g.K; ++kw) {
          const i64 ow = reader<S>(iw, kw, g, g.OW);
          if (ow < 0) continue;
          const float* base = gy + (oh * g.OW + ow) * g.N + n0;
          const i64 t = kh * g.K + kw;
          for (i64 k = taps[t]; k < taps[t + 1]; ++k) acc.axpy(w[in_flat[k]], base + in_o[k] * plane);
        }
      }
      acc.store(gx + ((c * g.H + ih) * g.W + iw) * g.N + n0);
    }
  };
};

template <int S>
void input_grad(const Geometry& g, const float* gy, const float* w, float* gx, const i64* in_ptr,
                const i64* in_flat, const i32* in_o, int threads) {
  const i64 blocks = (g.C + kChannelBlock - 1) / kChannelBlock, items = g.H * g.W * blocks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (i64 item = 0; item < items; ++item) {  // consecutive items: one input position, all channels
    const i64 pos = item / blocks, c0 = (item % blocks) * kChannelBlock;
    const i64 ih = pos / g.W, iw = pos % g.W, c1 = c0 + kChannelBlock < g.C ? c0 + kChannelBlock : g.C;
    for (i64 c = c0; c < c1; ++c)
      over_batch<InputGradTileFor<S>::template Tile>(g.N, g, gy, w, gx, c, ih, iw, in_ptr, in_flat, in_o);
  }
}

// An output box [oh0, oh1) x [ow0, ow1): where a tap's windows lie inside the image.
struct Box {
  i64 oh0, oh1, ow0, ow1;
};

// For G entries of one (output channel, tap) run: sums[e] += the sum over the box's positions and batch
// elements [n0, n1) (a multiple of B) of gy[pos, n] * xs[e][pos * stride, n] (gy and xs[e] point at the
// tap's first row). Each load of gy serves all G entries.
template <int G, int B>
inline void tap_dots(const Geometry& g, const float* __restrict gy, const float* const* xs, const Box& box,
                     i64 n0, i64 n1, float* sums) {
  Lanes<B> acc[G];
  for (int e = 0; e < G; ++e) acc[e].fill(0.0f);
  for (i64 n = n0; n < n1; n += B)
    for (i64 oh = box.oh0; oh < box.oh1; ++oh)
      for (i64 ow = box.ow0; ow < box.ow1; ++ow) {
        Lanes<B> d;
        d.load(gy + (oh * g.OW + ow) * g.N + n);
        const i64 at = (oh * g.stride * g.W + ow * g.stride) * g.N + n;
#pragma GCC unroll 4
        for (int e = 0; e < G; ++e) acc[e].fma(d, xs[e] + at);
      }
  for (int e = 0; e < G; ++e) sums[e] += acc[e].sum();
}

// All batch elements: blocks of 32 (G x 2 vector accumulators), then 16, then one at a time.
template <int G>
inline void tap_group(const Geometry& g, const float* gy, const float* const* xs, const Box& box, float* sums) {
  const i64 big = g.N / 32 * 32, mid = g.N / 16 * 16;
  if (big) tap_dots<G, 32>(g, gy, xs, box, 0, big, sums);
  if (mid > big) tap_dots<G, 16>(g, gy, xs, box, big, mid, sums);
  if (g.N > mid) tap_dots<G, 1>(g, gy, xs, box, mid, g.N, sums);
}

// gw at every active entry: for each output channel (in parallel) and tap, the output box whose windows
// put the tap inside the image, then dot products over that box and the batch, kGroup entries at a time.
template <int S>
void weight_grad(const Geometry& g, const float* x, const float* gy, float* gw, const i64* out_ptr,
                 const i64* out_flat, const i32* out_ch, int threads) {
  constexpr int kGroup = 4;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (i64 o = 0; o < g.O; ++o) {
    const float* gyo = gy + o * g.OH * g.OW * g.N;
    for (i64 kh = 0; kh < g.K; ++kh) {
      for (i64 kw = 0; kw < g.K; ++kw) {
        const Box box{first_output<S>(kh, g.pad, g.stride), end_output<S>(kh, g.pad, g.stride, g.H, g.OH),
                      first_output<S>(kw, g.pad, g.stride), end_output<S>(kw, g.pad, g.stride, g.W, g.OW)};
        if (box.oh0 >= box.oh1 || box.ow0 >= box.ow1) continue;  // reads only padding: gradient 0 (gw zeroed)
        const i64 t = (o * g.K + kh) * g.K + kw;
        for (i64 k0 = out_ptr[t]; k0 < out_ptr[t + 1]; k0 += kGroup) {
          const int count = static_cast<int>(out_ptr[t + 1] - k0 < kGroup ? out_ptr[t + 1] - k0 : kGroup);
          const float* xs[kGroup];
          for (int e = 0; e < count; ++e)  // x at the tap's position for output (0, 0)
            xs[e] = x + ((out_ch[k0 + e] * g.H + kh - g.pad) * g.W + kw - g.pad) * g.N;
          float sums[kGroup] = {0.0f, 0.0f, 0.0f, 0.0f};
          switch (count) {
            case 1: tap_group<1>(g, gyo, xs, box, sums); break;
            case 2: tap_group<2>(g, gyo, xs, box, sums); break;
            case 3: tap_group<3>(g, gyo, xs, box, sums); break;
            default: tap_group<4>(g, gyo, xs, box, sums); break;
          }
          for (int e = 0; e < count; ++e) gw[out_flat[k0 + e]] = sums[e];
        }
      }
    }
  }
}

// Calls f(std::integral_constant<int, S>) with S the stride when it is 1 or 2, else 0 (read at run time):
// each kernel is compiled once per case, with shifts instead of divisions for 1 and 2.
template <class F>
inline void with_stride(i64 stride, F&& f) {
  if (stride == 1)
    f(std::integral_constant<int, 1>{});
  else if (stride == 2)
    f(std::integral_constant<int, 2>{});
  else
    f(std::integral_constant<int, 0>{});
}

}  // namespace

extern "C" {

// y = conv(x, w masked to its active entries) + bias (bias may be null).
void itop_sparse_forward(const i64* geometry, const float* x, const float* w, const float* bias, float* y,
                         const i64* out_ptr, const i64* out_flat, const i32* out_ch, int threads) {
  const Geometry g(geometry);
  const i64 blocks = (g.O + kChannelBlock - 1) / kChannelBlock, items = g.OH * g.OW * blocks;
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
  for (i64 item = 0; item < items; ++item) {  // consecutive items: one output position, all channels
    const i64 pos = item / blocks, o0 = (item % blocks) * kChannelBlock;
    const i64 oh = pos / g.OW, ow = pos % g.OW, o1 = o0 + kChannelBlock < g.O ? o0 + kChannelBlock : g.O;
    for (i64 o = o0; o < o1; ++o)
      over_batch<ForwardTile>(g.N, g, x, w, y, bias ? bias[o] : 0.0f, o, oh, ow, out_ptr, out_flat, out_ch);
  }
}

// gx = the gradient of the loss with respect to x, given gy.
void itop_sparse_input_grad(const i64* geometry, const float* gy, const float* w, float* gx,
                            const i64* in_ptr, const i64* in_flat, const i32* in_o, int threads) {
  const Geometry g(geometry);
  with_stride(g.stride, [&](auto s) { input_grad<decltype(s)::value>(g, gy, w, gx, in_ptr, in_flat, in_o, threads); });
}

// gw = the gradient of the loss with respect to the weight at its active entries (gw's other entries
// are left as they are: zeros).
void itop_sparse_weight_grad(const i64* geometry, const float* x, const float* gy, float* gw,
                             const i64* out_ptr, const i64* out_flat, const i32* out_ch, int threads) {
  const Geometry g(geometry);
  with_stride(g.stride, [&](auto s) { weight_grad<decltype(s)::value>(g, x, gy, gw, out_ptr, out_flat, out_ch, threads); });
}

}  // extern "C"
