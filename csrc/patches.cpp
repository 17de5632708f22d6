// A batch of aligned, augmented LR/HR training patches, cropped and widened to float32 in
// one pass over each patch.
//
// Inputs: N decoded uint8 images per side (lr[i] pairs with hr[i]), each (C, H, W) or
// (H, W, C) with any strides, the scale s, the LR patch size P, the batch size B and a
// seed. Outputs: lr (B, C, P, P) and hr (B, C, sP, sP) float32 in 0..255, and params
// (B, 6) int64 holding each sample's (image, top, left, hflip, vflip, transpose).
//
// Semantics (those of fastsr.data.crop_pair / gather_patches): the LR crop starts at LR
// pixel (top, left), the HR crop at (s * top, s * left); crops stay inside
// crop_h = min(lr_h, hr_h / s) by crop_w = min(lr_w, hr_w / s). Both crops get the same
// horizontal flip, then vertical flip, then transpose (with the flips: all 8 rotations
// and mirrors). Output pixel (i, j) of a Q x Q patch reads crop pixel (a, b) = (j, i) if
// transposed else (i, j), then a -> Q-1-a for a vertical flip, b -> Q-1-b for a horizontal one.
//
// Random numbers: the splitmix64 sequence of `seed` (Steele, Lea & Flood 2014; the
// seeding generator of xoshiro). Output k (0-based) is
//     mix(seed + (k + 1) * 0x9E3779B97F4A7C15)           (mod 2^64)
//     mix(z): z = (z ^ z >> 30) * 0xBF58476D1CE4E5B9; z = (z ^ z >> 27) * 0x94D049BB133111EB;
//             return z ^ z >> 31
// Sample b uses outputs 4b .. 4b+3 (r0..r3): image = (r0 * N) >> 64, top = (r1 * (crop_h -
// P + 1)) >> 64, left = (r2 * (crop_w - P + 1)) >> 64 (128-bit products: Lemire's
// multiply-shift, bias below 2^-40 for these ranges), hflip = bit 63 of r3, vflip = bit 62,
// transpose = bit 61. The draws are counter-based, so a batch is the same on any number
// of threads, and fastsr/ext.py reproduces it bit for bit in Python.
//
// Cost per batch of 16 at P = 48, x2: 16 * 3 * (48^2 + 96^2) = 553k pixels read as bytes
// and written as float32 (2.2 MB); one sample per parallel task.
#include "fastsr_ext.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
#include <vector>

namespace fastsr_ext {
namespace {

constexpr uint64_t kGolden = 0x9E3779B97F4A7C15ULL;

inline uint64_t mix64(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

// Output k of the splitmix64 sequence seeded with `seed`.
inline uint64_t splitmix64_at(uint64_t seed, uint64_t k) { return mix64(seed + (k + 1) * kGolden); }

// Uniform integer in [0, n) from 64 random bits.
inline int64_t below(uint64_t r, uint64_t n) {
  return static_cast<int64_t>((static_cast<unsigned __int128>(r) * n) >> 64);
}

// A 3-D uint8 image seen as (C, H, W) through its strides.
struct ImageView {
  const uint8_t* data;
  int64_t c, h, w;
  int64_t sc, sh, sw;
};

ImageView view_of(const at::Tensor& t, bool hwc) {
  ImageView v;
  v.data = t.data_ptr<uint8_t>();
  const int dc = hwc ? 2 : 0, dh = hwc ? 0 : 1, dw = hwc ? 1 : 2;
  v.c = t.size(dc);
  v.h = t.size(dh);
  v.w = t.size(dw);
  v.sc = t.stride(dc);
  v.sh = t.stride(dh);
  v.sw = t.stride(dw);
  return v;
}

// out[j] = src[j * step] widened to float; the unit-stride cases vectorize.
inline void copy_line(const uint8_t* src, int64_t step, int64_t n, float* out) {
  if (step == 1) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(src[j]);
  } else if (step == -1) {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(src[-j]);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(src[j * step]);
  }
}

// 8x8 byte transpose in 64-bit words (little-endian: byte k of word r is element (r, k)):
// three rounds of swapping 1-, 2- and 4-byte blocks between rows 1, 2 and 4 apart. After
// it, byte k of word r is the input's element (k, r).
inline void transpose8x8(uint64_t r[8]) {
  for (int i = 0; i < 8; i += 2) {
    const uint64_t t = ((r[i] >> 8) ^ r[i + 1]) & 0x00FF00FF00FF00FFULL;
    r[i + 1] ^= t;
    r[i] ^= t << 8;
  }
  for (int i : {0, 1, 4, 5}) {
    const uint64_t t = ((r[i] >> 16) ^ r[i + 2]) & 0x0000FFFF0000FFFFULL;
    r[i + 2] ^= t;
    r[i] ^= t << 16;
  }
  for (int i = 0; i < 4; ++i) {
    const uint64_t t = ((r[i] >> 32) ^ r[i + 4]) & 0x00000000FFFFFFFFULL;
    r[i + 4] ^= t;
    r[i] ^= t << 32;
  }
}

// Copy the q x q crop at (top, left) of `img`, augmented, into dst (C, q, q) float32.
// Every output row is a straight line through the crop, read forwards or backwards along
// a crop row (contiguous for CHW: vectorized), or, transposed, down a crop column. For a
// transposed patch of a CHW image with q % 8 == 0 the crop is first transposed into
// `scratch` (q * q bytes) in 8x8 byte blocks, so the columns become contiguous rows too;
// otherwise columns are read with a stride (scalar).
void copy_patch(const ImageView& img, int64_t top, int64_t left, int64_t q, bool hflip, bool vflip,
                bool transpose, float* dst, std::vector<uint8_t>& scratch) {
  const bool blocked = transpose && img.sw == 1 && q % 8 == 0;
  if (blocked) scratch.resize(static_cast<size_t>(q * q));
  for (int64_t c = 0; c < img.c; ++c) {
    const uint8_t* base = img.data + c * img.sc + top * img.sh + left * img.sw;
    float* out = dst + c * q * q;
    if (blocked) {
      // scratch[b * q + a] = crop(a, b).
      uint8_t* t = scratch.data();
      for (int64_t a0 = 0; a0 < q; a0 += 8) {
        for (int64_t b0 = 0; b0 < q; b0 += 8) {
          uint64_t r[8];
          for (int u = 0; u < 8; ++u) std::memcpy(&r[u], base + (a0 + u) * img.sh + b0, 8);
          transpose8x8(r);
          for (int u = 0; u < 8; ++u) std::memcpy(t + (b0 + u) * q + a0, &r[u], 8);
        }
      }
      for (int64_t i = 0; i < q; ++i) {
        // Output row i = crop column b, a running down, or up for a vertical flip.
        const int64_t b = hflip ? q - 1 - i : i;
        copy_line(t + b * q + (vflip ? q - 1 : 0), vflip ? -1 : 1, q, out + i * q);
      }
      continue;
    }
    for (int64_t i = 0; i < q; ++i) {
      if (!transpose) {
        // Output row i = crop row a, b running forwards, or backwards for a horizontal flip.
        const int64_t a = vflip ? q - 1 - i : i;
        const uint8_t* start = base + a * img.sh + (hflip ? (q - 1) * img.sw : 0);
        copy_line(start, hflip ? -img.sw : img.sw, q, out + i * q);
      } else {
        const int64_t b = hflip ? q - 1 - i : i;
        const uint8_t* start = base + b * img.sw + (vflip ? (q - 1) * img.sh : 0);
        copy_line(start, vflip ? -img.sh : img.sh, q, out + i * q);
      }
    }
  }
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_patches(at::TensorList lr, at::TensorList hr,
                                                              int64_t scale, int64_t patch_size,
                                                              int64_t batch_size, int64_t seed,
                                                              std::string_view layout) {
  const char* fn = "fastsr_ext::sample_patches: ";
  TORCH_CHECK(layout == "CHW" || layout == "HWC", fn, "layout must be \"CHW\" or \"HWC\", got \"",
              std::string(layout), "\"");
  const bool hwc = layout == "HWC";
  TORCH_CHECK(!lr.empty(), fn, "needs at least one image, got an empty list");
  TORCH_CHECK(lr.size() == hr.size(), fn, "lr and hr must list the same number of images, got ", lr.size(),
              " and ", hr.size());
  TORCH_CHECK(scale >= 1, fn, "scale must be a positive int, got ", scale);
  TORCH_CHECK(patch_size >= 1, fn, "patch_size must be positive, got ", patch_size);
  TORCH_CHECK(batch_size >= 0, fn, "batch_size must be non-negative, got ", batch_size);

  const int64_t n = static_cast<int64_t>(lr.size());
  std::vector<ImageView> lr_v(n), hr_v(n);
  std::vector<int64_t> crop_h(n), crop_w(n);
  for (int64_t i = 0; i < n; ++i) {
    for (const auto* side : {&lr[i], &hr[i]}) {
      const at::Tensor& t = *side;
      const char* name = side == &lr[i] ? "lr" : "hr";
      TORCH_CHECK(t.defined(), fn, name, "[", i, "] is an undefined tensor");
      TORCH_CHECK(t.device().is_cpu(), fn, name, "[", i, "] must be a CPU tensor, got device ", t.device());
      TORCH_CHECK(t.scalar_type() == at::kByte, fn, name, "[", i, "] must be uint8, got ", t.scalar_type());
      TORCH_CHECK(t.dim() == 3, fn, name, "[", i, "] must have shape ", hwc ? "(H, W, C)" : "(C, H, W)",
                  ", got shape ", t.sizes());
    }
    lr_v[i] = view_of(lr[i], hwc);
    hr_v[i] = view_of(hr[i], hwc);
    TORCH_CHECK(lr_v[i].c == lr_v[0].c && hr_v[i].c == lr_v[0].c, fn,
                "all images must have the same number of channels (", lr_v[0].c, " in lr[0]), got ", lr_v[i].c,
                " in lr[", i, "] and ", hr_v[i].c, " in hr[", i, "] (is layout=\"", std::string(layout),
                "\" right?)");
    crop_h[i] = std::min(lr_v[i].h, hr_v[i].h / scale);
    crop_w[i] = std::min(lr_v[i].w, hr_v[i].w / scale);
    TORCH_CHECK(crop_h[i] >= patch_size && crop_w[i] >= patch_size, fn, "image ", i, " is too small: lr ",
                lr_v[i].h, "x", lr_v[i].w, " with hr ", hr_v[i].h, "x", hr_v[i].w, " at x", scale,
                " leaves a ", crop_h[i], "x", crop_w[i], " LR area, smaller than the patch (", patch_size, "x",
                patch_size, ")");
  }

  const int64_t c = lr_v[0].c, p = patch_size, q = scale * patch_size;
  auto f32 = at::TensorOptions().dtype(at::kFloat);
  at::Tensor lr_out = at::empty({batch_size, c, p, p}, f32);
  at::Tensor hr_out = at::empty({batch_size, c, q, q}, f32);
  at::Tensor params = at::empty({batch_size, 6}, at::TensorOptions().dtype(at::kLong));
  float* lr_ptr = lr_out.data_ptr<float>();
  float* hr_ptr = hr_out.data_ptr<float>();
  int64_t* prm = params.data_ptr<int64_t>();
  const uint64_t useed = static_cast<uint64_t>(seed);

  // The draws (a few ns each), then the copies.
  for (int64_t b = 0; b < batch_size; ++b) {
    const uint64_t k = 4 * static_cast<uint64_t>(b);
    const int64_t img = below(splitmix64_at(useed, k), n);
    const uint64_t flags = splitmix64_at(useed, k + 3);
    int64_t* row = prm + 6 * b;
    row[0] = img;
    row[1] = below(splitmix64_at(useed, k + 1), crop_h[img] - p + 1);
    row[2] = below(splitmix64_at(useed, k + 2), crop_w[img] - p + 1);
    row[3] = (flags >> 63) & 1;  // hflip
    row[4] = (flags >> 62) & 1;  // vflip
    row[5] = (flags >> 61) & 1;  // transpose
  }

  at::parallel_for(0, batch_size, 1, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> scratch;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t* row = prm + 6 * b;
      const int64_t img = row[0], top = row[1], left = row[2];
      const bool hflip = row[3], vflip = row[4], transpose = row[5];
      copy_patch(lr_v[img], top, left, p, hflip, vflip, transpose, lr_ptr + b * c * p * p, scratch);
      copy_patch(hr_v[img], scale * top, scale * left, q, hflip, vflip, transpose, hr_ptr + b * c * q * q,
                 scratch);
    }
  });
  return {lr_out, hr_out, params};
}

}  // namespace fastsr_ext
