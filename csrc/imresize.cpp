// MATLAB-compatible bicubic imresize on the CPU: the C++ twin of fastsr/imresize.py.
//
// Computes, for an (..., H, W) image, MATLAB's imresize(img, scale_or_size, 'bicubic'):
// Keys' cubic with a = -0.5, stretched by 1/scale when shrinking with antialiasing,
// MATLAB's coordinate mapping u = x / scale + (1 - 1 / scale) / 2, symmetric edges that
// repeat the border pixel, and the dimension with the smaller scale resized first. uint8
// images are computed in float64 and rounded half away from zero, saturated to 0..255 after
// each 1-D pass, as MATLAB does; float32 images are computed in float32, float64 in float64.
//
// Instead of the Python version's dense (out, in) matrices (mostly zeros) each axis gets a
// sparse table: per output pixel, `taps` input indices and weights, mirrored taps merged
// into one (the Python version sums them with scatter_add the same way). For x1/4 a
// 2040-wide row needs 18 taps per output instead of 2040 matrix entries.
//
// Passes, for P = N * C planes:
//   rows    (P, in_h, W) -> (P, out_h, W): output row o = sum_k w[o, k] * input row idx[o, k];
//           the inner loop runs along W over contiguous memory and vectorizes.
//   columns (P, H, in_w) -> (P, H, out_w): 8 (float64) or 16 (float32) rows at a time are
//           transposed into a (in_w, lanes) buffer, so out[o] = sum_k w[o, k] * col[idx[o, k]]
//           is one 64-byte multiply-add per tap for all those rows at once.
// Both passes are split over (plane, row) with at::parallel_for. Reads/writes per pass:
// the input once (plus taps/scale re-reads from cache), the output once.
#include "fastsr_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <memory>
#include <vector>

namespace fastsr_ext {
namespace {

// Keys' cubic convolution kernel, a = -0.5 (MATLAB's `cubic`); the same expression order
// as fastsr/imresize.py::_cubic, so the weights agree to the last bit before normalizing.
inline double cubic(double x) {
  const double ax = std::abs(x);
  const double ax2 = ax * ax;
  const double ax3 = ax2 * ax;
  const double inner = (ax <= 1) ? (1.5 * ax3 - 2.5 * ax2 + 1.0) : 0.0;
  const double outer = (ax > 1 && ax <= 2) ? (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) : 0.0;
  return inner + outer;
}

// One axis of the resize: output pixel o reads input idx[o * taps + k] with weight
// w[o * taps + k], k < taps. Rows shorter than `taps` (after merging mirrored duplicates)
// are padded with weight 0 on a valid index.
struct AxisWeights {
  int64_t in_len = 0;
  int64_t out_len = 0;
  int64_t taps = 0;
  std::vector<int64_t> idx;
  std::vector<double> w;
};

// MATLAB's `contributions` (fastsr/imresize.py::_contributions, then the scatter_add of
// resize_weights, kept sparse).
AxisWeights contributions(int64_t in_len, int64_t out_len, double scale, bool antialias) {
  const bool stretch = scale < 1 && antialias;
  double kernel_width = 4.0;
  if (stretch) kernel_width = kernel_width / scale;
  const int64_t P = static_cast<int64_t>(std::ceil(kernel_width)) + 2;

  std::vector<double> weights(out_len * P);
  std::vector<int64_t> indices(out_len * P);
  for (int64_t o = 0; o < out_len; ++o) {
    // 1-based, as in MATLAB.
    const double x = static_cast<double>(o + 1);
    const double u = x / scale + 0.5 * (1 - 1 / scale);
    const double left = std::floor(u - kernel_width / 2);
    double sum = 0;
    for (int64_t k = 0; k < P; ++k) {
      const double j = left + static_cast<double>(k);
      const double d = u - j;
      const double wk = stretch ? scale * cubic(scale * d) : cubic(d);
      weights[o * P + k] = wk;
      sum += wk;
      // Symmetric padding: aux = [1..n, n..1] indexed cyclically (repeats the edge pixel).
      const int64_t period = 2 * in_len;
      int64_t m = (static_cast<int64_t>(j) - 1) % period;
      if (m < 0) m += period;
      indices[o * P + k] = (m < in_len) ? m : period - 1 - m;
    }
    for (int64_t k = 0; k < P; ++k) weights[o * P + k] = weights[o * P + k] / sum;
  }

  // MATLAB drops tap columns that are zero for every output; then merge the taps of one
  // output that mirrored onto the same input pixel (weights summed in column order).
  std::vector<char> keep(P, 0);
  for (int64_t o = 0; o < out_len; ++o)
    for (int64_t k = 0; k < P; ++k)
      if (weights[o * P + k] != 0) keep[k] = 1;

  std::vector<std::vector<std::pair<int64_t, double>>> rows(out_len);
  int64_t taps = 1;
  for (int64_t o = 0; o < out_len; ++o) {
    auto& row = rows[o];
    for (int64_t k = 0; k < P; ++k) {
      if (!keep[k]) continue;
      const int64_t i = indices[o * P + k];
      const double wk = weights[o * P + k];
      auto it = std::find_if(row.begin(), row.end(), [i](const auto& e) { return e.first == i; });
      if (it == row.end()) {
        row.emplace_back(i, 0.0 + wk);
      } else {
        it->second += wk;
      }
    }
    taps = std::max<int64_t>(taps, static_cast<int64_t>(row.size()));
  }

  AxisWeights aw;
  aw.in_len = in_len;
  aw.out_len = out_len;
  aw.taps = taps;
  aw.idx.assign(out_len * taps, 0);
  aw.w.assign(out_len * taps, 0.0);
  for (int64_t o = 0; o < out_len; ++o) {
    const auto& row = rows[o];
    const int64_t pad_index = row.empty() ? 0 : row.front().first;
    for (int64_t k = 0; k < taps; ++k) {
      const bool real = k < static_cast<int64_t>(row.size());
      aw.idx[o * taps + k] = real ? row[k].first : pad_index;
      aw.w[o * taps + k] = real ? row[k].second : 0.0;
    }
  }
  return aw;
}

// What a pass writes: uint8 is rounded half away from zero after saturating (MATLAB's
// imresizemex returns the input's class after every pass); floats are stored as computed.
template <typename Out, typename Acc>
inline Out finish(Acc v) {
  if constexpr (std::is_same_v<Out, uint8_t>) {
    v = v < Acc(0) ? Acc(0) : v;
    v = v > Acc(255) ? Acc(255) : v;
    // floor(v + 0.5) as the Python version computes it; v + 0.5 >= 0, so truncation is
    // floor, and it vectorizes.
    return static_cast<uint8_t>(static_cast<int32_t>(v + Acc(0.5)));
  } else {
    return static_cast<Out>(v);
  }
}

// Elements of one accumulator block: 256 float64 = 2 KiB, stays in L1 while all the taps
// of one output row are added into it.
constexpr int64_t kRowBlock = 256;

// Rows of one column block, transposed into registers' worth of lanes: 64 bytes of the
// accumulator type (8 float64 / 16 float32), so the tap loop of the column pass is one
// vector multiply-add per tap.
template <typename Acc>
constexpr int64_t kLanes = 64 / static_cast<int64_t>(sizeof(Acc));

// Work per parallel_for task (multiply-adds), so that small images do not pay the
// thread fork for nothing.
constexpr int64_t kGrainMacs = 1 << 15;

// acc[j] (+)= w0 a0[j] + ... + w{N-1} a{N-1}[j] for N <= 4 taps, evaluated left to right:
// the same roundings as adding the taps one at a time, with a quarter of the accumulator
// traffic. Separate functions with restrict pointers, so the compiler emits one clean
// vector loop (widening the input in registers).
template <int N, bool First, typename In, typename Acc>
__attribute__((noinline)) void add_taps(Acc* __restrict acc, const In* __restrict a0, const In* __restrict a1,
                                        const In* __restrict a2, const In* __restrict a3, const Acc* w,
                                        int64_t n) {
  const Acc w0 = w[0], w1 = N > 1 ? w[1] : Acc(0), w2 = N > 2 ? w[2] : Acc(0), w3 = N > 3 ? w[3] : Acc(0);
  for (int64_t j = 0; j < n; ++j) {
    Acc v = First ? w0 * static_cast<Acc>(a0[j]) : acc[j] + w0 * static_cast<Acc>(a0[j]);
    if constexpr (N > 1) v = v + w1 * static_cast<Acc>(a1[j]);
    if constexpr (N > 2) v = v + w2 * static_cast<Acc>(a2[j]);
    if constexpr (N > 3) v = v + w3 * static_cast<Acc>(a3[j]);
    acc[j] = v;
  }
}

template <bool First, typename In, typename Acc>
inline void add_group(int64_t count, Acc* acc, const In* const* a, const Acc* w, int64_t n) {
  switch (count) {
    case 1: add_taps<1, First>(acc, a[0], a[0], a[0], a[0], w, n); break;
    case 2: add_taps<2, First>(acc, a[0], a[1], a[1], a[1], w, n); break;
    case 3: add_taps<3, First>(acc, a[0], a[1], a[2], a[2], w, n); break;
    default: add_taps<4, First>(acc, a[0], a[1], a[2], a[3], w, n); break;
  }
}

template <typename In, typename Acc>
__attribute__((noinline)) void widen_row(Acc* __restrict out, const In* __restrict a, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = static_cast<Acc>(a[j]);
}

template <typename Out, typename Acc>
__attribute__((noinline)) void finish_row(Out* __restrict out, const Acc* __restrict acc, int64_t n) {
  for (int64_t j = 0; j < n; ++j) out[j] = finish<Out, Acc>(acc[j]);
}

// (P, in_h, W) -> (P, out_h, W).
template <typename In, typename Out, typename Acc>
void resize_rows(const In* src, Out* dst, int64_t planes, int64_t width, const AxisWeights& aw) {
  const int64_t in_h = aw.in_len, out_h = aw.out_len, taps = aw.taps;
  std::vector<Acc> w(aw.w.begin(), aw.w.end());
  const int64_t* idx = aw.idx.data();
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, width * taps));
  at::parallel_for(0, planes * out_h, grain, [&](int64_t begin, int64_t end) {
    alignas(64) Acc acc[kRowBlock];
    for (int64_t t = begin; t < end; ++t) {
      const int64_t p = t / out_h, o = t % out_h;
      const In* plane = src + p * in_h * width;
      Out* out = dst + (p * out_h + o) * width;
      const int64_t* ri = idx + o * taps;
      const Acc* rw = w.data() + o * taps;
      for (int64_t j0 = 0; j0 < width; j0 += kRowBlock) {
        const int64_t n = std::min(kRowBlock, width - j0);
        const In* base = plane + j0;
        for (int64_t k = 0; k < taps; k += 4) {
          const int64_t count = std::min<int64_t>(4, taps - k);
          const In* a[4];
          for (int64_t g = 0; g < count; ++g) a[g] = base + ri[k + g] * width;
          if (k == 0) {
            add_group<true>(count, acc, a, rw, n);
          } else {
            add_group<false>(count, acc, a, rw + k, n);
          }
        }
        finish_row<Out, Acc>(out + j0, acc, n);
      }
    }
  });
}

// (P, H, in_w) -> (P, H, out_w), kLanes rows at a time: the block is transposed to
// (in_w, kLanes) in the accumulator type, each output column is then a tap loop of
// 64-byte multiply-adds (GCC/Clang vector extensions: one AVX-512 or two AVX2 ops), and
// the result is transposed back on the way out.
template <typename In, typename Out, typename Acc>
void resize_cols(const In* src, Out* dst, int64_t planes, int64_t height, const AxisWeights& aw) {
  constexpr int64_t L = kLanes<Acc>;
  typedef Acc Vec __attribute__((vector_size(64)));
  const int64_t in_w = aw.in_len, out_w = aw.out_len, taps = aw.taps;
  std::vector<Acc> w(aw.w.begin(), aw.w.end());
  const int64_t* idx = aw.idx.data();
  const int64_t rows = planes * height;
  const int64_t blocks = (rows + L - 1) / L;
  const int64_t grain = std::max<int64_t>(1, kGrainMacs / std::max<int64_t>(1, L * out_w * taps));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    // Raw 64-byte aligned storage: a template argument (std::vector<Vec>) drops the
    // vector attribute.
    std::unique_ptr<void, void (*)(void*)> storage(std::aligned_alloc(64, sizeof(Vec) * in_w), std::free);
    TORCH_CHECK(storage, "fastsr_ext::imresize: out of memory for a ", in_w, "-column buffer");
    Vec* buf = static_cast<Vec*>(storage.get());
    std::vector<Acc> wide(static_cast<size_t>(L * in_w));
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t r0 = blk * L;
      const int64_t nr = std::min(L, rows - r0);
      // Widen each row (vectorized), then interleave the rows into lanes.
      for (int64_t r = 0; r < L; ++r) {
        Acc* t = wide.data() + r * in_w;
        if (r < nr) {
          widen_row<In, Acc>(t, src + (r0 + r) * in_w, in_w);
        } else {
          std::fill(t, t + in_w, Acc(0));
        }
      }
      const Acc* t = wide.data();
      for (int64_t j = 0; j < in_w; ++j) {
        Vec v;
        for (int64_t r = 0; r < L; ++r) v[r] = t[r * in_w + j];
        buf[j] = v;
      }
      for (int64_t o = 0; o < out_w; ++o) {
        const int64_t* oi = idx + o * taps;
        const Acc* ow = w.data() + o * taps;
        Vec acc = ow[0] * buf[oi[0]];
        for (int64_t k = 1; k < taps; ++k) acc = acc + ow[k] * buf[oi[k]];
        for (int64_t r = 0; r < nr; ++r) dst[(r0 + r) * out_w + o] = finish<Out, Acc>(acc[r]);
      }
    }
  });
}

// Resize planes (P, in_h, in_w) -> (P, out_h, out_w) in MATLAB's dimension order. `Mid`
// is the type between the passes: uint8 for uint8 images (rounded, as MATLAB), else the
// image type.
template <typename T, typename Acc>
void resize_planes(const T* src, T* dst, int64_t planes, int64_t in_h, int64_t in_w, const AxisWeights& wh,
                   const AxisWeights& ww, bool rows_first) {
  const int64_t out_h = wh.out_len, out_w = ww.out_len;
  if (rows_first) {
    std::vector<T> mid(static_cast<size_t>(planes * out_h * in_w));
    resize_rows<T, T, Acc>(src, mid.data(), planes, in_w, wh);
    resize_cols<T, T, Acc>(mid.data(), dst, planes, out_h, ww);
  } else {
    std::vector<T> mid(static_cast<size_t>(planes * in_h * out_w));
    resize_cols<T, T, Acc>(src, mid.data(), planes, in_h, ww);
    resize_rows<T, T, Acc>(mid.data(), dst, planes, out_w, wh);
  }
}

}  // namespace

at::Tensor imresize(const at::Tensor& img, std::optional<double> scale, at::OptionalIntArrayRef size,
                    bool antialias) {
  TORCH_CHECK(img.defined(), "fastsr_ext::imresize: img is an undefined tensor");
  TORCH_CHECK(img.device().is_cpu(), "fastsr_ext::imresize: img must be a CPU tensor, got device ",
              img.device());
  const auto dtype = img.scalar_type();
  TORCH_CHECK(dtype == at::kByte || dtype == at::kFloat || dtype == at::kDouble,
              "fastsr_ext::imresize: img dtype must be uint8, float32 or float64, got ", dtype);
  TORCH_CHECK(img.dim() >= 2 && img.dim() <= 4,
              "fastsr_ext::imresize: img must have shape (H, W), (C, H, W) or (N, C, H, W), got ", img.dim(),
              " dims with shape ", img.sizes());
  const int64_t in_h = img.size(-2), in_w = img.size(-1);
  TORCH_CHECK(in_h > 0 && in_w > 0, "fastsr_ext::imresize: img must have a non-empty H and W, got shape ",
              img.sizes());
  TORCH_CHECK(scale.has_value() != size.has_value(),
              "fastsr_ext::imresize: pass exactly one of scale= or size=, got ",
              scale.has_value() ? "both" : "neither");

  int64_t out_h = 0, out_w = 0;
  double scale_h = 0, scale_w = 0;
  if (scale.has_value()) {
    const double s = *scale;
    TORCH_CHECK(std::isfinite(s) && s > 0, "fastsr_ext::imresize: scale must be a positive finite number, got ",
                s);
    scale_h = scale_w = s;
    const double oh = std::ceil(static_cast<double>(in_h) * s), ow = std::ceil(static_cast<double>(in_w) * s);
    TORCH_CHECK(oh <= static_cast<double>(std::numeric_limits<int32_t>::max()) &&
                    ow <= static_cast<double>(std::numeric_limits<int32_t>::max()),
                "fastsr_ext::imresize: scale ", s, " makes an output of ", oh, "x", ow, " pixels, too large");
    out_h = static_cast<int64_t>(oh);
    out_w = static_cast<int64_t>(ow);
  } else {
    const auto sz = *size;
    TORCH_CHECK(sz.size() == 2, "fastsr_ext::imresize: size must be (out_h, out_w), got ", sz.size(),
                " entries");
    TORCH_CHECK(sz[0] > 0 && sz[1] > 0, "fastsr_ext::imresize: size entries must be positive, got (", sz[0],
                ", ", sz[1], ")");
    out_h = sz[0];
    out_w = sz[1];
    scale_h = static_cast<double>(out_h) / static_cast<double>(in_h);
    scale_w = static_cast<double>(out_w) / static_cast<double>(in_w);
  }

  std::vector<int64_t> out_shape(img.sizes().begin(), img.sizes().end());
  out_shape[out_shape.size() - 2] = out_h;
  out_shape[out_shape.size() - 1] = out_w;
  at::Tensor out = at::empty(out_shape, img.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t planes = img.numel() / (in_h * in_w);
  if (planes == 0) return out;

  const at::Tensor x = img.contiguous();
  const AxisWeights wh = contributions(in_h, out_h, scale_h, antialias);
  const AxisWeights ww = contributions(in_w, out_w, scale_w, antialias);
  // MATLAB resizes the dimension with the smaller scale first (rows on ties).
  const bool rows_first = scale_h <= scale_w;

  switch (dtype) {
    case at::kByte:
      resize_planes<uint8_t, double>(x.data_ptr<uint8_t>(), out.data_ptr<uint8_t>(), planes, in_h, in_w, wh, ww,
                                     rows_first);
      break;
    case at::kFloat:
      resize_planes<float, float>(x.data_ptr<float>(), out.data_ptr<float>(), planes, in_h, in_w, wh, ww,
                                  rows_first);
      break;
    default:
      resize_planes<double, double>(x.data_ptr<double>(), out.data_ptr<double>(), planes, in_h, in_w, wh, ww,
                                    rows_first);
      break;
  }
  return out;
}

}  // namespace fastsr_ext
