#include <gtest/gtest.h>
#include <torch/torch.h>
#include <unistd.h>
#include <zlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "dynattn/data/fashion_mnist.h"
#include "dynattn/data/idx.h"
#include "test_util.h"

namespace fs = std::filesystem;
using dynattn::read_idx_gz;
using dynattn::test_util::error_of;

namespace {

using Bytes = std::vector<unsigned char>;

// IDX header for unsigned-byte data of the given dims.
Bytes idx_header(const std::vector<uint32_t>& dims, unsigned char type = 0x08) {
  Bytes b = {0, 0, type, static_cast<unsigned char>(dims.size())};
  for (uint32_t d : dims) {
    for (int s = 24; s >= 0; s -= 8) b.push_back(static_cast<unsigned char>(d >> s));
  }
  return b;
}

Bytes idx_file(const std::vector<uint32_t>& dims, const Bytes& payload) {
  Bytes b = idx_header(dims);
  b.insert(b.end(), payload.begin(), payload.end());
  return b;
}

Bytes iota_bytes(size_t n) {
  Bytes b(n);
  for (size_t i = 0; i < n; ++i) b[i] = static_cast<unsigned char>(i % 251);
  return b;
}

void write_gz(const std::string& path, const Bytes& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr) << path;
  if (!bytes.empty()) {
    ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())),
              static_cast<int>(bytes.size()));
  }
  ASSERT_EQ(gzclose(f), Z_OK);
}

void write_raw(const std::string& path, const Bytes& bytes) {
  std::ofstream out(path, std::ios::binary);
  out.write(reinterpret_cast<const char*>(bytes.data()),
            static_cast<std::streamsize>(bytes.size()));
}

#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE((haystack).find(needle), std::string::npos) << "message: " << (haystack)

class IdxTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string tmpl = (fs::temp_directory_path() / "dynattn_idx_XXXXXX").string();
    ASSERT_NE(mkdtemp(tmpl.data()), nullptr);
    dir_ = tmpl;
  }
  void TearDown() override { fs::remove_all(dir_); }
  std::string path(const std::string& name) const { return (fs::path(dir_) / name).string(); }

  // A synthetic Fashion-MNIST root: n_train/n_test images of side x side, labels i % 10.
  void write_fashion(size_t n_train, size_t n_test, uint32_t side = 28) {
    for (auto [prefix, n] : {std::pair<std::string, size_t>{"train", n_train}, {"t10k", n_test}}) {
      write_gz(path(prefix + "-images-idx3-ubyte.gz"),
               idx_file({static_cast<uint32_t>(n), side, side}, iota_bytes(n * side * side)));
      Bytes labels(n);
      for (size_t i = 0; i < n; ++i) labels[i] = static_cast<unsigned char>(i % 10);
      write_gz(path(prefix + "-labels-idx1-ubyte.gz"),
               idx_file({static_cast<uint32_t>(n)}, labels));
    }
  }

  std::string dir_;
};

}  // namespace

TEST_F(IdxTest, ParsesTinyFile) {
  write_gz(path("t.gz"), idx_file({2, 3, 4}, iota_bytes(24)));
  const torch::Tensor t = read_idx_gz(path("t.gz"));
  EXPECT_EQ(t.scalar_type(), torch::kUInt8);
  EXPECT_EQ(t.sizes(), (std::vector<int64_t>{2, 3, 4}));
  EXPECT_TRUE(t.equal(torch::arange(24, torch::kUInt8).view({2, 3, 4})));
}

TEST_F(IdxTest, ParsesOneAndFourDims) {
  write_gz(path("l.gz"), idx_file({5}, {9, 8, 7, 6, 5}));
  EXPECT_TRUE(read_idx_gz(path("l.gz")).equal(torch::tensor({9, 8, 7, 6, 5}, torch::kUInt8)));
  write_gz(path("4d.gz"), idx_file({1, 2, 1, 3}, iota_bytes(6)));
  EXPECT_EQ(read_idx_gz(path("4d.gz")).sizes(), (std::vector<int64_t>{1, 2, 1, 3}));
}

TEST_F(IdxTest, AcceptsUncompressedFile) {
  write_raw(path("raw"), idx_file({2, 2}, {1, 2, 3, 4}));
  EXPECT_TRUE(
      read_idx_gz(path("raw")).equal(torch::tensor({1, 2, 3, 4}, torch::kUInt8).view({2, 2})));
}

TEST_F(IdxTest, WrongMagic) {
  Bytes b = idx_file({2}, {1, 2});
  b[0] = 0x1f;
  write_gz(path("bad.gz"), b);
  const std::string msg = error_of([&] { read_idx_gz(path("bad.gz")); });
  EXPECT_CONTAINS(msg, path("bad.gz"));
  EXPECT_CONTAINS(msg, "magic");
  EXPECT_CONTAINS(msg, "0x1f");
}

TEST_F(IdxTest, UnsupportedType) {
  Bytes b = idx_header({2}, 0x0D);
  b.resize(b.size() + 8, 0);
  write_gz(path("float.gz"), b);
  const std::string msg = error_of([&] { read_idx_gz(path("float.gz")); });
  EXPECT_CONTAINS(msg, path("float.gz"));
  EXPECT_CONTAINS(msg, "unsupported IDX element type 0x0d (float32)");
}

TEST_F(IdxTest, BadDimensionCount) {
  write_gz(path("d0.gz"), Bytes{0, 0, 8, 0});
  EXPECT_CONTAINS(error_of([&] { read_idx_gz(path("d0.gz")); }), "declares 0 dimensions");
  write_gz(path("d5.gz"), idx_file({1, 1, 1, 1, 1}, {7}));
  EXPECT_CONTAINS(error_of([&] { read_idx_gz(path("d5.gz")); }), "declares 5 dimensions");
}

TEST_F(IdxTest, TruncatedData) {
  write_gz(path("short.gz"), idx_file({10, 28, 28}, iota_bytes(1000)));
  const std::string msg = error_of([&] {
    read_idx_gz(path("short.gz"),
                dynattn::IdxReadOptions().context("fashion-mnist").payload("image data"));
  });
  EXPECT_CONTAINS(msg, "fashion-mnist: " + path("short.gz") +
                           ": truncated: expected 7840 bytes of image data, got 1000");
}

TEST_F(IdxTest, TruncatedHeader) {
  write_gz(path("h.gz"), Bytes{0, 0, 8, 3, 0, 0});
  const std::string msg = error_of([&] { read_idx_gz(path("h.gz")); });
  EXPECT_CONTAINS(msg, "truncated: expected 12 bytes of dimension sizes, got 2");
  write_gz(path("empty.gz"), Bytes{});
  EXPECT_CONTAINS(error_of([&] { read_idx_gz(path("empty.gz")); }), "4-byte IDX header");
}

TEST_F(IdxTest, TruncatedGzipStream) {
  // A .gz cut short mid-stream: the decompressed payload comes up short.
  Bytes noise(64 * 64);
  uint32_t state = 12345;  // incompressible, so half the .gz is well inside the payload
  for (auto& v : noise)
    v = static_cast<unsigned char>((state = state * 1664525u + 1013904223u) >> 24);
  write_gz(path("full.gz"), idx_file({64, 64}, noise));
  std::ifstream in(path("full.gz"), std::ios::binary);
  Bytes gz((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  gz.resize(gz.size() / 2);
  write_raw(path("cut.gz"), gz);
  const std::string msg = error_of([&] { read_idx_gz(path("cut.gz")); });
  EXPECT_CONTAINS(msg, path("cut.gz"));
  EXPECT_CONTAINS(msg, "truncated");
  // Cut inside the 8-byte CRC/length trailer: all data is there but unverified.
  gz.clear();
  std::ifstream in2(path("full.gz"), std::ios::binary);
  gz.assign(std::istreambuf_iterator<char>(in2), std::istreambuf_iterator<char>());
  gz.resize(gz.size() - 4);
  write_raw(path("cut_trailer.gz"), gz);
  EXPECT_CONTAINS(error_of([&] { read_idx_gz(path("cut_trailer.gz")); }), "truncated gzip stream");
}

TEST_F(IdxTest, TrailingBytes) {
  Bytes b = idx_file({3}, {1, 2, 3});
  b.push_back(42);
  b.push_back(43);
  write_gz(path("long.gz"), b);
  const std::string msg = error_of([&] { read_idx_gz(path("long.gz")); });
  EXPECT_CONTAINS(msg, path("long.gz"));
  EXPECT_CONTAINS(msg, "2 unexpected trailing bytes after the 3 bytes of data");
}

TEST_F(IdxTest, MissingFileNamesPath) {
  const std::string msg = error_of([&] { read_idx_gz(path("nope.gz")); });
  EXPECT_CONTAINS(msg, path("nope.gz"));
  EXPECT_CONTAINS(msg, "cannot open");
}

TEST_F(IdxTest, FashionMnistSyntheticRoot) {
  write_fashion(12, 7);
  const auto data = dynattn::load_fashion_mnist(dir_);
  EXPECT_EQ(data.train_images.sizes(), (std::vector<int64_t>{12, 28, 28}));
  EXPECT_EQ(data.test_images.sizes(), (std::vector<int64_t>{7, 28, 28}));
  EXPECT_EQ(data.train_labels.scalar_type(), torch::kInt64);
  EXPECT_EQ(data.train_labels[11].item<int64_t>(), 1);
  EXPECT_EQ(data.test_labels.size(0), 7);
}

TEST_F(IdxTest, FashionMnistAcceptsUnpackedFiles) {
  write_fashion(3, 2);
  // Replace one .gz with its unpacked form.
  fs::remove(path("t10k-labels-idx1-ubyte.gz"));
  write_raw(path("t10k-labels-idx1-ubyte"), idx_file({2}, {4, 5}));
  const auto data = dynattn::load_fashion_mnist(dir_ + "/");
  EXPECT_TRUE(data.test_labels.equal(torch::tensor({4, 5}, torch::kInt64)));
}

TEST_F(IdxTest, FashionMnistMissingFileHints) {
  write_fashion(3, 2);
  fs::remove(path("train-images-idx3-ubyte.gz"));
  const std::string msg = error_of([&] { dynattn::load_fashion_mnist(dir_); });
  EXPECT_CONTAINS(msg, "fashion-mnist: " + path("train-images-idx3-ubyte.gz"));
  EXPECT_CONTAINS(msg, "--data");
  EXPECT_CONTAINS(msg, "dataset-fashion-mnist");
}

TEST_F(IdxTest, FashionMnistLabelOutOfRange) {
  write_fashion(4, 2);
  write_gz(path("train-labels-idx1-ubyte.gz"), idx_file({4}, {0, 1, 10, 3}));
  const std::string msg = error_of([&] { dynattn::load_fashion_mnist(dir_); });
  EXPECT_CONTAINS(msg, path("train-labels-idx1-ubyte.gz"));
  EXPECT_CONTAINS(msg, "label 10 at index 2 is out of range; expected 0..9");
}

TEST_F(IdxTest, FashionMnistCountMismatch) {
  write_fashion(4, 2);
  write_gz(path("t10k-labels-idx1-ubyte.gz"), idx_file({3}, {0, 1, 2}));
  const std::string msg = error_of([&] { dynattn::load_fashion_mnist(dir_); });
  EXPECT_CONTAINS(msg, "has 2 images but " + path("t10k-labels-idx1-ubyte.gz") + " has 3 labels");
}

TEST_F(IdxTest, FashionMnistWrongShapes) {
  write_fashion(4, 2, 27);
  EXPECT_CONTAINS(error_of([&] { dynattn::load_fashion_mnist(dir_); }),
                  "expected images of shape [N, 28, 28], got [4, 27, 27]");
  write_fashion(4, 2);
  write_gz(path("train-labels-idx1-ubyte.gz"), idx_file({2, 2}, {0, 1, 2, 3}));
  EXPECT_CONTAINS(error_of([&] { dynattn::load_fashion_mnist(dir_); }),
                  "expected labels of shape [N], got [2, 2]");
}

TEST(FashionMnist, ClassNames) {
  const auto& c = dynattn::fashion_mnist_classes();
  ASSERT_EQ(c.size(), 10u);
  EXPECT_EQ(c[0], "T-shirt/top");
  EXPECT_EQ(c[6], "Shirt");
  EXPECT_EQ(c[9], "Ankle boot");
}

TEST(FashionMnist, RealData) {
  if (!fs::exists(dynattn::kFashionMnistDefaultRoot)) {
    GTEST_SKIP() << dynattn::kFashionMnistDefaultRoot
                 << " not found (Debian package dataset-fashion-mnist not installed)";
  }
  const auto data = dynattn::load_fashion_mnist();
  EXPECT_EQ(data.train_images.sizes(), (std::vector<int64_t>{60000, 28, 28}));
  EXPECT_EQ(data.test_images.sizes(), (std::vector<int64_t>{10000, 28, 28}));
  EXPECT_EQ(data.train_labels.sizes(), (std::vector<int64_t>{60000}));
  EXPECT_EQ(data.test_labels.sizes(), (std::vector<int64_t>{10000}));
  EXPECT_TRUE(torch::bincount(data.train_labels).equal(torch::full({10}, 6000, torch::kInt64)));
  EXPECT_TRUE(torch::bincount(data.test_labels).equal(torch::full({10}, 1000, torch::kInt64)));
  // The normalisation constants are the train set's pixel statistics.
  const torch::Tensor x = data.train_images.to(torch::kDouble).div_(255.0);
  EXPECT_NEAR(x.mean().item<double>(), dynattn::kFashionMnistMean, 1e-9);
  EXPECT_NEAR(x.std(/*unbiased=*/false).item<double>(), dynattn::kFashionMnistStd, 1e-9);
}
