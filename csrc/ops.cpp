// Op registration for fastsr._C, and the output path to_uint8_hwc.
//
// The ops live in the `fastsr_ext` namespace (torch.ops.fastsr_ext.*); `fastsr::` belongs
// to the Python custom ops. They are registered as catch-all kernels that check the device
// themselves, so a wrong input gets a message naming the argument instead of a dispatcher
// error. None of them is differentiable (they feed and drain the models).
#include "fastsr_ext.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace fastsr_ext {
namespace {

// torch.round(x).clamp(0, 255).to(uint8): round half to even (the default rounding mode,
// as torch.round), saturate; NaN -> 0 (what the torch expression gives on x86).
template <typename T>
inline uint8_t to_u8(T v) {
  v = v >= T(0) ? v : T(0);  // also maps NaN to 0
  v = v <= T(255) ? v : T(255);
  return static_cast<uint8_t>(std::nearbyint(v));
}

template <typename T>
__attribute__((noinline)) void round_row(uint8_t* __restrict out, const T* __restrict in, int64_t n) {
  for (int64_t x = 0; x < n; ++x) out[x] = to_u8(in[x]);
}

// Pixels per chunk of a row: rounded into per-channel byte buffers (vectorized), then
// interleaved. 3 x 512 bytes of buffers stay in L1.
constexpr int64_t kChunk = 512;

// (N, C, H, W) contiguous -> (N, H, W, C) uint8; one task per image row. Per row: C
// float rows read (4 * C * W bytes), one interleaved byte row written (C * W bytes).
template <typename T>
void hwc_kernel(const T* src, uint8_t* dst, int64_t n, int64_t c, int64_t h, int64_t w) {
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, c * w));
  at::parallel_for(0, n * h, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> planes(static_cast<size_t>(c * kChunk));
    for (int64_t t = begin; t < end; ++t) {
      const int64_t img = t / h, y = t % h;
      const T* row = src + (img * c * h + y) * w;  // channel 0 of this row
      uint8_t* out = dst + t * w * c;
      for (int64_t x0 = 0; x0 < w; x0 += kChunk) {
        const int64_t m = std::min(kChunk, w - x0);
        for (int64_t ch = 0; ch < c; ++ch) round_row<T>(planes.data() + ch * kChunk, row + ch * h * w + x0, m);
        uint8_t* o = out + x0 * c;
        if (c == 3) {
          const uint8_t* r = planes.data();
          const uint8_t* g = r + kChunk;
          const uint8_t* b = g + kChunk;
          for (int64_t x = 0; x < m; ++x) {
            o[3 * x] = r[x];
            o[3 * x + 1] = g[x];
            o[3 * x + 2] = b[x];
          }
        } else {
          for (int64_t ch = 0; ch < c; ++ch) {
            const uint8_t* p = planes.data() + ch * kChunk;
            for (int64_t x = 0; x < m; ++x) o[x * c + ch] = p[x];
          }
        }
      }
    }
  });
}

}  // namespace

at::Tensor to_uint8_hwc(const at::Tensor& img) {
  const char* fn = "fastsr_ext::to_uint8_hwc: ";
  TORCH_CHECK(img.defined(), fn, "img is an undefined tensor");
  TORCH_CHECK(img.device().is_cpu(), fn, "img must be a CPU tensor, got device ", img.device());
  TORCH_CHECK(img.dim() == 3 || img.dim() == 4, fn, "img must have shape (N, C, H, W) or (C, H, W), got ",
              img.dim(), " dims with shape ", img.sizes());
  const auto dtype = img.scalar_type();
  TORCH_CHECK(at::isFloatingType(dtype), fn, "img must be a floating tensor (values 0..255), got ", dtype);
  // Half / bfloat16 are widened once; float32 and float64 are read as they are.
  at::Tensor x = (dtype == at::kFloat || dtype == at::kDouble) ? img : img.to(at::kFloat);
  const bool batched = x.dim() == 4;
  if (!batched) x = x.unsqueeze(0);
  x = x.contiguous();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  at::Tensor out = at::empty({n, h, w, c}, x.options().dtype(at::kByte));
  if (out.numel() > 0) {
    if (x.scalar_type() == at::kFloat) {
      hwc_kernel<float>(x.data_ptr<float>(), out.data_ptr<uint8_t>(), n, c, h, w);
    } else {
      hwc_kernel<double>(x.data_ptr<double>(), out.data_ptr<uint8_t>(), n, c, h, w);
    }
  }
  return batched ? out : out.squeeze(0);
}

}  // namespace fastsr_ext

TORCH_LIBRARY(fastsr_ext, m) {
  m.def("imresize(Tensor img, float? scale=None, int[]? size=None, bool antialias=True) -> Tensor",
        &fastsr_ext::imresize);
  m.def(
      "sample_patches(Tensor[] lr, Tensor[] hr, int scale, int patch_size, int batch_size, int seed, "
      "str layout=\"CHW\") -> (Tensor, Tensor, Tensor)",
      &fastsr_ext::sample_patches);
  m.def("to_uint8_hwc(Tensor img) -> Tensor", &fastsr_ext::to_uint8_hwc);
}
