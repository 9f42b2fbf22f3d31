// IDX files: the big-endian tensor format of (Fashion-)MNIST — magic 0x00 0x00 <type> <ndims>,
// ndims uint32 sizes, then the raw elements — read straight from their .gz form in memory.
#pragma once
#include <torch/arg.h>
#include <torch/types.h>

#include <string>

namespace dynattn {

// How read_idx_gz names things in its errors; the reader itself knows nothing of datasets.
struct IdxReadOptions {
  // Prefix of every error message, e.g. "fashion-mnist".
  TORCH_ARG(std::string, context) = "idx";
  // What the payload is, for the truncation message ("expected N bytes of image data").
  TORCH_ARG(std::string, payload) = "data";
  // Appended to the "cannot open" error, e.g. where to get the files.
  TORCH_ARG(std::string, missing_hint) = "";
};

// Reads a gzip-compressed (or, transparently, uncompressed) IDX file into a kUInt8 tensor of
// its dims. Only element type 0x08 (unsigned byte) and 1..4 dims are supported. The payload
// must have exactly prod(dims) bytes: a truncated file or trailing bytes are errors.
torch::Tensor read_idx_gz(const std::string& path, const IdxReadOptions& options = {});

}  // namespace dynattn
