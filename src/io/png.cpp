#include "dynattn/io/png.h"

#include <png.h>

#include <cstring>

#include "dynattn/io/atomic_file.h"

namespace dynattn {
namespace {

struct ReadCursor {
  const std::string* bytes;
  size_t offset;
};

// libpng reports errors through longjmp; these handlers turn them into a message that the
// caller raises as a c10::Error after setjmp returns.
void on_error(png_structp png, png_const_charp message) {
  auto* text = static_cast<std::string*>(png_get_error_ptr(png));
  *text = message;
  png_longjmp(png, 1);
}
void on_warning(png_structp, png_const_charp) {}

}  // namespace

std::string encode_png(const torch::Tensor& image, const std::string& path_for_errors) {
  TORCH_CHECK(image.defined() && image.scalar_type() == torch::kUInt8 &&
                  (image.dim() == 2 || (image.dim() == 3 && image.size(2) == 3)),
              path_for_errors, ": a PNG needs a uint8 image [H,W] or [H,W,3], got ",
              image.defined() ? c10::str(image.scalar_type(), " ", image.sizes()) : "nothing");
  TORCH_CHECK(image.size(0) > 0 && image.size(1) > 0 && image.size(0) < (1 << 20) &&
                  image.size(1) < (1 << 20),
              path_for_errors, ": image size out of range: ", image.sizes());
  const torch::Tensor pixels = image.to(torch::kCPU).contiguous();
  // volatile: live across setjmp, so they must not be kept in registers longjmp restores.
  volatile const int height = static_cast<int>(pixels.size(0));
  volatile const int width = static_cast<int>(pixels.size(1));
  volatile const int channels = pixels.dim() == 3 ? 3 : 1;

  std::string error, out;
  png_structp png = png_create_write_struct(PNG_LIBPNG_VER_STRING, &error, on_error, on_warning);
  TORCH_CHECK(png != nullptr, path_for_errors, ": libpng could not start");
  png_infop info = png_create_info_struct(png);
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_write_struct(&png, &info);
    TORCH_CHECK(false, path_for_errors, ": PNG encoding failed: ", error);
  }
  png_set_write_fn(
      png, &out,
      [](png_structp p, png_bytep data, png_size_t n) {
        static_cast<std::string*>(png_get_io_ptr(p))->append(reinterpret_cast<char*>(data), n);
      },
      nullptr);
  png_set_IHDR(png, info, width, height, 8,
               channels == 3 ? PNG_COLOR_TYPE_RGB : PNG_COLOR_TYPE_GRAY, PNG_INTERLACE_NONE,
               PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info(png, info);
  const auto* base = pixels.data_ptr<uint8_t>();
  for (int y = 0; y < height; ++y) {
    png_write_row(png, const_cast<png_bytep>(base + static_cast<size_t>(y) * width * channels));
  }
  png_write_end(png, nullptr);
  png_destroy_write_struct(&png, &info);
  return out;
}

void write_png(const std::string& path, const torch::Tensor& image) {
  write_file_atomic(path, encode_png(image, path));
}

torch::Tensor read_png(const std::string& path) {
  const std::string bytes = read_file(path);
  TORCH_CHECK(
      bytes.size() >= 8 && png_sig_cmp(reinterpret_cast<png_const_bytep>(bytes.data()), 0, 8) == 0,
      path, ": not a PNG file");
  std::string error;
  png_structp png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &error, on_error, on_warning);
  TORCH_CHECK(png != nullptr, path, ": libpng could not start");
  png_infop info = png_create_info_struct(png);
  torch::Tensor image;
  if (info == nullptr || setjmp(png_jmpbuf(png))) {
    png_destroy_read_struct(&png, &info, nullptr);
    TORCH_CHECK(false, path, ": corrupt PNG: ", error);
  }
  ReadCursor cursor{&bytes, 0};
  png_set_read_fn(png, &cursor, [](png_structp p, png_bytep data, png_size_t n) {
    auto* c = static_cast<ReadCursor*>(png_get_io_ptr(p));
    if (c->offset + n > c->bytes->size()) png_error(p, "truncated file");
    std::memcpy(data, c->bytes->data() + c->offset, n);
    c->offset += n;
  });
  png_read_info(png, info);
  const auto color = png_get_color_type(png, info);
  const auto depth = png_get_bit_depth(png, info);
  if (depth != 8 || (color != PNG_COLOR_TYPE_GRAY && color != PNG_COLOR_TYPE_RGB)) {
    png_destroy_read_struct(&png, &info, nullptr);
    TORCH_CHECK(false, path, ": only 8-bit grey or RGB PNGs are read, got colour type ",
                static_cast<int>(color), ", depth ", static_cast<int>(depth));
  }
  const int64_t h = png_get_image_height(png, info), w = png_get_image_width(png, info);
  const int64_t channels = color == PNG_COLOR_TYPE_RGB ? 3 : 1;
  image =
      channels == 3 ? torch::empty({h, w, 3}, torch::kUInt8) : torch::empty({h, w}, torch::kUInt8);
  auto* base = image.data_ptr<uint8_t>();
  for (int64_t y = 0; y < h; ++y) png_read_row(png, base + y * w * channels, nullptr);
  png_read_end(png, nullptr);
  png_destroy_read_struct(&png, &info, nullptr);
  return image;
}

}  // namespace dynattn
