// PNG output for attention pictures: 8-bit grey or RGB images from tensors, written
// atomically (libpng into memory, then write_file_atomic).
#pragma once
#include <torch/torch.h>

#include <string>

namespace dynattn {

// `image`: uint8 [H,W] (grey) or [H,W,3] (RGB), on any device. Fails naming `path` otherwise.
std::string encode_png(const torch::Tensor& image, const std::string& path_for_errors = "png");
void write_png(const std::string& path, const torch::Tensor& image);

// Reads an 8-bit grey or RGB PNG back as uint8 [H,W] or [H,W,3] (for tests and tools).
torch::Tensor read_png(const std::string& path);

}  // namespace dynattn
