#include "dynattn/data/idx.h"

#include <torch/torch.h>
#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <limits>

namespace dynattn {
namespace {

// Closes the gzFile on every exit path, including TORCH_CHECK throws.
struct GzCloser {
  gzFile file;
  ~GzCloser() {
    if (file != nullptr) gzclose(file);
  }
};

const char* idx_type_name(unsigned type) {
  switch (type) {
    case 0x08:
      return "unsigned byte";
    case 0x09:
      return "signed byte";
    case 0x0B:
      return "int16";
    case 0x0C:
      return "int32";
    case 0x0D:
      return "float32";
    case 0x0E:
      return "float64";
    default:
      return "unknown";
  }
}

std::string hex_byte(unsigned char b) {
  static const char* digits = "0123456789abcdef";
  return std::string("0x") + digits[b >> 4] + digits[b & 15];
}

// Reads up to `len` bytes (gzread takes an unsigned int, so large payloads go in chunks).
// Returns the number read, fewer only at end of input; read and inflate errors throw.
int64_t read_fully(gzFile f, void* dst, int64_t len, const std::string& where) {
  auto* out = static_cast<unsigned char*>(dst);
  int64_t done = 0;
  constexpr int64_t kChunk = int64_t{1} << 30;
  while (done < len) {
    const auto want = static_cast<unsigned>(std::min(kChunk, len - done));
    const int got = gzread(f, out + done, want);
    if (got < 0) {
      int err = 0;
      const char* msg = gzerror(f, &err);
      TORCH_CHECK(false, where, ": read failed: ", msg ? msg : "unknown zlib error");
    }
    if (got == 0) break;
    done += got;
  }
  return done;
}

}  // namespace

torch::Tensor read_idx_gz(const std::string& path, const IdxReadOptions& options) {
  const std::string where = options.context() + ": " + path;
  errno = 0;
  GzCloser gz{gzopen(path.c_str(), "rb")};
  if (gz.file == nullptr) {
    const std::string reason = errno != 0 ? std::strerror(errno) : "out of memory";
    TORCH_CHECK(false, where, ": cannot open (", reason, ")",
                options.missing_hint().empty() ? "" : "; ", options.missing_hint());
  }
  // The default 8 KiB buffer makes the 26 MB train images noticeably slower to inflate.
  gzbuffer(gz.file, 1 << 18);

  unsigned char magic[4];
  const int64_t magic_got = read_fully(gz.file, magic, 4, where);
  TORCH_CHECK(magic_got == 4, where, ": truncated: expected a 4-byte IDX header, got ", magic_got,
              " bytes");
  TORCH_CHECK(magic[0] == 0 && magic[1] == 0, where,
              ": not an IDX file: magic number must start with 0x00 0x00, got ", hex_byte(magic[0]),
              " ", hex_byte(magic[1]));
  TORCH_CHECK(magic[2] == 0x08, where, ": unsupported IDX element type ", hex_byte(magic[2]), " (",
              idx_type_name(magic[2]), "); only 0x08 (unsigned byte) is supported");
  const int ndims = magic[3];
  TORCH_CHECK(ndims >= 1 && ndims <= 4, where, ": IDX header declares ", ndims,
              " dimensions; expected 1 to 4");

  unsigned char dim_bytes[16];
  const int64_t dims_got = read_fully(gz.file, dim_bytes, 4 * ndims, where);
  TORCH_CHECK(dims_got == 4 * ndims, where, ": truncated: expected ", 4 * ndims,
              " bytes of dimension sizes, got ", dims_got);
  std::vector<int64_t> sizes(ndims);
  int64_t numel = 1;
  for (int d = 0; d < ndims; ++d) {
    const unsigned char* b = dim_bytes + 4 * d;
    sizes[d] = (int64_t{b[0]} << 24) | (int64_t{b[1]} << 16) | (int64_t{b[2]} << 8) | b[3];
    // Guards the product against overflow; no real IDX file comes near 2^48 bytes.
    TORCH_CHECK(sizes[d] == 0 || numel <= (int64_t{1} << 48) / sizes[d], where,
                ": IDX dimensions are implausibly large");
    numel *= sizes[d];
  }

  torch::Tensor out = torch::empty(sizes, torch::kUInt8);
  const int64_t got = read_fully(gz.file, out.data_ptr<uint8_t>(), numel, where);
  TORCH_CHECK(got == numel, where, ": truncated: expected ", numel, " bytes of ", options.payload(),
              ", got ", got);

  // Anything after the payload means the header does not describe the file.
  int64_t trailing = 0;
  unsigned char scratch[4096];
  for (;;) {
    const int64_t n = read_fully(gz.file, scratch, sizeof(scratch), where);
    trailing += n;
    if (n < static_cast<int64_t>(sizeof(scratch))) break;
  }
  TORCH_CHECK(trailing == 0, where, ": ", trailing, " unexpected trailing bytes after the ", numel,
              " bytes of ", options.payload(), " declared by the header");
  // zlib reports a gzip stream cut inside its 8-byte trailer only as Z_BUF_ERROR at the end;
  // the data may be complete but its CRC was never checked.
  int err = Z_OK;
  gzerror(gz.file, &err);
  TORCH_CHECK(err == Z_OK, where, ": truncated gzip stream (unexpected end of file)");
  return out;
}

}  // namespace dynattn
