// fastsr._C: CPU kernels for the data path around the models (see ops.cpp for the schemas).
//
//   imresize        MATLAB-compatible bicubic resize (imresize.cpp), the C++ twin of
//                   fastsr/imresize.py;
//   sample_patches  a batch of aligned, augmented LR/HR training patches (patches.cpp);
//   to_uint8_hwc    float SR output -> rounded, clamped uint8 HWC (ops.cpp).
//
// Every entry checks its arguments with TORCH_CHECK, which Python sees as a RuntimeError
// carrying the message. Work is split with at::parallel_for (OpenMP in torch's CPU
// builds), so torch.set_num_threads() applies.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string_view>
#include <tuple>

namespace fastsr_ext {

at::Tensor imresize(const at::Tensor& img, std::optional<double> scale, at::OptionalIntArrayRef size,
                    bool antialias);

std::tuple<at::Tensor, at::Tensor, at::Tensor> sample_patches(at::TensorList lr, at::TensorList hr,
                                                              int64_t scale, int64_t patch_size,
                                                              int64_t batch_size, int64_t seed,
                                                              std::string_view layout);

at::Tensor to_uint8_hwc(const at::Tensor& img);

}  // namespace fastsr_ext
