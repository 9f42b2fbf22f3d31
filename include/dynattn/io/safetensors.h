// safetensors: the tensor file format of Hugging Face (https://github.com/huggingface/safetensors,
// format described in its README). Layout: an 8-byte little-endian unsigned header length N,
// N bytes of JSON header {name: {"dtype": "F32", "shape": [...], "data_offsets": [begin, end]},
// optional "__metadata__": {string: string}}, then the data buffer the offsets point into.
// Implemented by hand (no package exists) and as strict as the reference reader: tensors must
// tile the data buffer exactly, without overlaps or gaps.
#pragma once
#include <torch/torch.h>

#include <map>
#include <string>
#include <utility>
#include <vector>

namespace dynattn {

struct SafetensorsFile {
  // In the order of the file's header; each tensor owns its memory (CPU, contiguous).
  std::vector<std::pair<std::string, torch::Tensor>> tensors;
  std::map<std::string, std::string> metadata;

  // nullptr when there is no tensor of that name.
  const torch::Tensor* find(const std::string& name) const;
  std::map<std::string, torch::Tensor> as_map() const;
};

// Decodes the bytes of a safetensors file. `origin` (usually the file name) prefixes errors.
// Supported dtypes: F64, F32, F16, BF16, I64, I32, I16, I8, U8, BOOL.
SafetensorsFile parse_safetensors(const std::string& bytes, const std::string& origin);
SafetensorsFile read_safetensors(const std::string& path);

// Encodes tensors (any device, any strides) in the given order, like the reference writer:
// compact JSON header padded with spaces to a multiple of 8 bytes, "__metadata__" first.
std::string serialize_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata = {});
// serialize_safetensors + write_file_atomic.
void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace dynattn
