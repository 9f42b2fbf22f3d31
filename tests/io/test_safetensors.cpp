#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <cstring>
#include <filesystem>
#include <functional>

#include "dynattn/io/atomic_file.h"
#include "dynattn/io/safetensors.h"
#include "test_util.h"

using dynattn::parse_safetensors;
using dynattn::read_file;
using dynattn::read_safetensors;
using dynattn::serialize_safetensors;
using dynattn::write_file_atomic;
using dynattn::write_safetensors;
using dynattn::test_util::error_of;
using ::testing::HasSubstr;
using Named = std::vector<std::pair<std::string, torch::Tensor>>;
namespace fs = std::filesystem;

namespace {

// A fresh directory under /tmp, removed with its content at the end of the test.
class TempDir {
 public:
  TempDir() {
    char tmpl[] = "/tmp/dynattn_io_XXXXXX";
    TORCH_CHECK(::mkdtemp(tmpl), "mkdtemp failed");
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    fs::permissions(path_, fs::perms::owner_all, fs::perm_options::add, ec);
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return path_ + "/" + name; }
  std::vector<std::string> list() const {
    std::vector<std::string> names;
    for (const auto& e : fs::directory_iterator(path_)) names.push_back(e.path().filename());
    std::sort(names.begin(), names.end());
    return names;
  }
  const std::string& path() const { return path_; }

 private:
  std::string path_;
};

// A safetensors byte string with the given (unpadded) header text and data buffer.
std::string raw_file(const std::string& header, const std::string& data = "") {
  std::string out;
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((header.size() >> (8 * i)) & 0xff));
  return out + header + data;
}

std::string parse_error(const std::string& header, const std::string& data = "") {
  return error_of([&] { parse_safetensors(raw_file(header, data), "bad.safetensors"); });
}

// Same dtype, shape and bytes: NaN payloads and -0.0 must survive too.
void expect_bitwise_equal(const torch::Tensor& got, const torch::Tensor& want) {
  ASSERT_EQ(got.scalar_type(), want.scalar_type());
  ASSERT_EQ(got.sizes(), want.sizes());
  auto g = got.to(torch::kCPU).contiguous();
  auto w = want.to(torch::kCPU).contiguous();
  if (w.numel() == 0) return;
  EXPECT_EQ(std::memcmp(g.data_ptr(), w.data_ptr(), w.numel() * w.element_size()), 0)
      << "got " << got << "\nwant " << want;
}

Named round_trip(const Named& tensors, const std::map<std::string, std::string>& meta = {}) {
  auto file = parse_safetensors(serialize_safetensors(tensors, meta), "memory");
  EXPECT_EQ(file.metadata, meta);
  EXPECT_EQ(file.tensors.size(), tensors.size());
  return file.tensors;
}

Named every_dtype() {
  auto opts = [](torch::ScalarType t) { return torch::TensorOptions().dtype(t); };
  return {
      {"f64", torch::randn({2, 3}, opts(torch::kFloat64))},
      {"f32", torch::randn({4}, opts(torch::kFloat32))},
      {"f16", torch::randn({3, 1}, opts(torch::kFloat16))},
      {"bf16", torch::randn({5}, opts(torch::kBFloat16))},
      {"i64", torch::tensor({INT64_MIN, int64_t{-1}, int64_t{0}, INT64_MAX})},
      {"i32", torch::tensor({INT32_MIN, -7, INT32_MAX}, opts(torch::kInt32))},
      {"i16", torch::tensor({-32768, 5, 32767}, opts(torch::kInt16))},
      {"i8", torch::tensor({-128, 0, 127}, opts(torch::kInt8))},
      {"u8", torch::tensor({0, 128, 255}, opts(torch::kUInt8))},
      {"bool", torch::tensor({true, false, true})},
  };
}

}  // namespace

TEST(Safetensors, RoundTripsEveryDtype) {
  const Named tensors = every_dtype();
  const Named got = round_trip(tensors);
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_EQ(got[i].first, tensors[i].first);
    expect_bitwise_equal(got[i].second, tensors[i].second);
  }
}

TEST(Safetensors, HalfAndBFloat16KeepExactBitPatterns) {
  // +0, -0, 1, -2, subnormal, max, +inf, -inf, quiet NaN, NaN with payload.
  const auto bits = torch::tensor({0x0000, 0x8000, 0x3c00, 0xc000, 0x0001, 0x7bff, 0x7c00, 0xfc00,
                                   0x7e00, 0x7d55},
                                  torch::kInt32)
                        .to(torch::kInt16);
  const auto got =
      round_trip({{"h", bits.view(torch::kFloat16)}, {"b", bits.view(torch::kBFloat16)}});
  EXPECT_TRUE(torch::equal(got[0].second.view(torch::kInt16), bits));
  EXPECT_TRUE(torch::equal(got[1].second.view(torch::kInt16), bits));
  EXPECT_EQ(got[0].second.scalar_type(), torch::kFloat16);
  EXPECT_EQ(got[1].second.scalar_type(), torch::kBFloat16);
}

TEST(Safetensors, ScalarAndEmptyTensors) {
  const Named tensors = {{"scalar", torch::tensor(2.5)},
                         {"empty", torch::zeros({0, 3}, torch::kInt64)},
                         {"empty2", torch::zeros({2, 0})},
                         {"after", torch::arange(3)}};
  const Named got = round_trip(tensors);
  EXPECT_EQ(got[0].second.dim(), 0);
  EXPECT_EQ(got[0].second.item<double>(), 2.5);
  for (size_t i = 0; i < tensors.size(); ++i)
    expect_bitwise_equal(got[i].second, tensors[i].second);
  EXPECT_TRUE(round_trip({}).empty());
}

TEST(Safetensors, MetadataRoundTrip) {
  const std::map<std::string, std::string> meta = {
      {"format", "pt"}, {"note", "quotes \" and \\ and\nnewline, ünïcode"}, {"empty", ""}};
  round_trip({{"x", torch::ones({2})}}, meta);
  round_trip({}, meta);
}

TEST(Safetensors, NonContiguousInputsAreWrittenByValue) {
  const auto base = torch::arange(24, torch::kFloat32).reshape({4, 6});
  const Named tensors = {
      {"transposed", base.t()},
      {"strided", base.index({torch::indexing::Slice(), torch::indexing::Slice(0, 6, 2)})},
      {"expanded", torch::arange(3).expand({4, 3})},
      {"offset", base[2]}};
  const Named got = round_trip(tensors);
  for (size_t i = 0; i < tensors.size(); ++i) {
    EXPECT_TRUE(got[i].second.is_contiguous());
    EXPECT_TRUE(torch::equal(got[i].second, tensors[i].second)) << tensors[i].first;
  }
  if (torch::cuda::is_available()) {
    const auto gpu = base.to(torch::kCUDA).t();
    expect_bitwise_equal(round_trip({{"gpu", gpu}})[0].second, gpu.cpu());
  }
}

TEST(Safetensors, SerializesLikeTheReferenceWriter) {
  // Compact JSON, "__metadata__" first, padded with spaces to a multiple of 8, data in order.
  const std::string bytes = serialize_safetensors(
      {{"b", torch::tensor({1.0f})}, {"a", torch::tensor({int16_t{-2}})}}, {{"k", "v"}});
  const std::string header =
      "{\"__metadata__\":{\"k\":\"v\"},"
      "\"b\":{\"dtype\":\"F32\",\"shape\":[1],\"data_offsets\":[0,4]},"
      "\"a\":{\"dtype\":\"I16\",\"shape\":[1],\"data_offsets\":[4,6]}}";
  const std::string padded = header + std::string((8 - header.size() % 8) % 8, ' ');
  EXPECT_EQ(bytes, raw_file(padded, std::string("\x00\x00\x80\x3f\xfe\xff", 6)));
  EXPECT_EQ(padded.size() % 8, 0u);
}

TEST(Safetensors, DecodesHandBuiltBuffer) {
  // Header order differs from data order; the result keeps the header order.
  const std::string header =
      "{\"w\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[4,12]},"
      "\"__metadata__\":{\"who\":\"hand\"},"
      "\"n\":{\"shape\":[2,1],\"dtype\":\"I16\",\"data_offsets\":[0,4]}}   ";
  const std::string data("\x01\x00\xff\xff\x00\x00\x80\x3f\x00\x00\x20\xc0", 12);
  const auto file = parse_safetensors(raw_file(header, data), "hand.safetensors");
  ASSERT_EQ(file.tensors.size(), 2u);
  EXPECT_EQ(file.tensors[0].first, "w");
  EXPECT_EQ(file.tensors[1].first, "n");
  EXPECT_TRUE(torch::equal(file.tensors[0].second, torch::tensor({1.0f, -2.5f})));
  EXPECT_TRUE(
      torch::equal(file.tensors[1].second, torch::tensor({1, -1}, torch::kInt16).reshape({2, 1})));
  EXPECT_EQ(file.metadata, (std::map<std::string, std::string>{{"who", "hand"}}));
  ASSERT_NE(file.find("n"), nullptr);
  EXPECT_EQ(file.find("n")->scalar_type(), torch::kInt16);
  EXPECT_EQ(file.find("missing"), nullptr);
  EXPECT_EQ(file.as_map().size(), 2u);
  EXPECT_EQ(file.as_map().count("w"), 1u);
}

TEST(Safetensors, ReadTensorsOwnTheirMemory) {
  std::string bytes = serialize_safetensors({{"x", torch::ones({4})}});
  const auto file = parse_safetensors(bytes, "memory");
  bytes.assign(bytes.size(), '\0');
  EXPECT_TRUE(torch::equal(file.tensors[0].second, torch::ones({4})));
}

TEST(Safetensors, WritesAndReadsFiles) {
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  const Named tensors = every_dtype();
  write_safetensors(path, tensors, {{"epoch", "3"}});
  const auto file = read_safetensors(path);
  EXPECT_EQ(file.metadata.at("epoch"), "3");
  ASSERT_EQ(file.tensors.size(), tensors.size());
  for (size_t i = 0; i < tensors.size(); ++i)
    expect_bitwise_equal(file.tensors[i].second, tensors[i].second);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"model.safetensors"});
}

// ---- malformed files: every error names the origin and the problem ----

TEST(SafetensorsErrors, TooShort) {
  const auto msg = error_of([] { parse_safetensors("abc", "bad.safetensors"); });
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("shorter than the 8-byte header length"));
}

TEST(SafetensorsErrors, HeaderLength) {
  std::string bytes = raw_file("{}");
  bytes[0] = 100;  // claims 100 header bytes, the file has 2
  auto msg = error_of([&] { parse_safetensors(bytes, "bad.safetensors"); });
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("header length 100 exceeds"));
  bytes.replace(0, 8, std::string("\x00\x00\x00\x00\x00\x00\x00\x01", 8));  // 2^56
  msg = error_of([&] { parse_safetensors(bytes, "bad.safetensors"); });
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("absurd"));
}

TEST(SafetensorsErrors, HeaderNotJsonObject) {
  for (const std::string header : {"{\"a\":", "not json", "{} trailing", "{\"a\":1,}"}) {
    const auto msg = parse_error(header);
    EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
    EXPECT_THAT(msg, HasSubstr("header is not valid JSON"));
  }
  for (const std::string header : {"[]", "42", "\"s\"", "null"}) {
    const auto msg = parse_error(header);
    EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
    EXPECT_THAT(msg, HasSubstr("header is not a JSON object"));
  }
}

TEST(SafetensorsErrors, EntryFields) {
  struct Case {
    std::string entry, problem;
  };
  const std::vector<Case> cases = {
      {"[]", "entry must be a JSON object"},
      {R"({"shape":[1],"data_offsets":[0,4]})", "missing 'dtype'"},
      {R"({"dtype":"F32","data_offsets":[0,4]})", "missing 'shape'"},
      {R"({"dtype":"F32","shape":[1]})", "missing 'data_offsets'"},
      {R"({"dtype":7,"shape":[1],"data_offsets":[0,4]})", "'dtype' must be a string"},
      {R"({"dtype":"F32","shape":1,"data_offsets":[0,4]})", "'shape' must be an array"},
      {R"({"dtype":"F32","shape":[1.5],"data_offsets":[0,4]})", "'shape' must be an array"},
      {R"({"dtype":"F32","shape":["1"],"data_offsets":[0,4]})", "'shape' must be an array"},
      {R"({"dtype":"F32","shape":[1],"data_offsets":[0]})", "'data_offsets' must be [begin, end]"},
      {R"({"dtype":"F32","shape":[1],"data_offsets":[0,-4]})",
       "'data_offsets' must be [begin, end]"},
      {R"({"dtype":"F32","shape":[1],"data_offsets":"0,4"})",
       "'data_offsets' must be [begin, end]"},
      {R"({"dtype":"F8_E4M3","shape":[1],"data_offsets":[0,4]})", "unknown dtype 'F8_E4M3'"},
      {R"({"dtype":"F32","shape":[2,-1],"data_offsets":[0,4]})", "negative dimension -1"},
      {R"({"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,4]})", "too large"},
  };
  for (const auto& c : cases) {
    const auto msg = parse_error("{\"t\":" + c.entry + "}", "abcd");
    EXPECT_THAT(msg, HasSubstr("bad.safetensors")) << c.entry;
    EXPECT_THAT(msg, HasSubstr("tensor 't'")) << c.entry;
    EXPECT_THAT(msg, HasSubstr(c.problem)) << c.entry;
  }
}

TEST(SafetensorsErrors, DataOffsets) {
  auto msg = parse_error(R"({"t":{"dtype":"U8","shape":[0],"data_offsets":[4,2]}})", "abcd");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("begin > end"));
  msg = parse_error(R"({"t":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})", "abcd");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("beyond the data buffer of 4 bytes"));
  msg = parse_error(R"({"t":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}})", "abcdefgh");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("span 8 bytes but shape [3] of F32 needs 12"));
}

TEST(SafetensorsErrors, OverlapsAndGaps) {
  auto msg = parse_error(R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                         R"("b":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                         "abcdefgh");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensors 'a' and 'b' overlap"));
  msg = parse_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})", "abcdefgh");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("bytes [0, 4) of the data buffer are not covered by any tensor"));
  msg = parse_error(R"({"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}})", "abcdefgh");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("bytes [4, 8) of the data buffer are not covered by any tensor"));
  msg = parse_error("{}", "x");
  EXPECT_THAT(msg, HasSubstr("bytes [0, 1) of the data buffer are not covered"));
}

TEST(SafetensorsErrors, DuplicateNames) {
  auto msg = parse_error(R"({"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},)"
                         R"("a":{"dtype":"U8","shape":[1],"data_offsets":[1,2]}})",
                         "ab");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("name 'a' appears twice"));

  TempDir dir;
  msg = error_of([&] {
    write_safetensors(dir.file("dup.safetensors"), {{"a", torch::ones(1)}, {"a", torch::ones(1)}});
  });
  EXPECT_THAT(msg, HasSubstr("dup.safetensors"));
  EXPECT_THAT(msg, HasSubstr("tensor name 'a' given twice"));
  EXPECT_TRUE(dir.list().empty());
  msg = error_of([] { serialize_safetensors({{"__metadata__", torch::ones(1)}}); });
  EXPECT_THAT(msg, HasSubstr("reserved for metadata"));
}

TEST(SafetensorsErrors, Metadata) {
  auto msg = parse_error(R"({"__metadata__":{"a":"x","n":1}})");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("__metadata__ value for 'n' is not a string"));
  msg = parse_error(R"({"__metadata__":["x"]})");
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("'__metadata__' must be an object of strings"));
}

TEST(SafetensorsErrors, BoolBytesMustBeZeroOrOne) {
  const auto msg = parse_error(R"({"b":{"dtype":"BOOL","shape":[2],"data_offsets":[0,2]}})",
                               std::string("\x01\x02", 2));
  EXPECT_THAT(msg, HasSubstr("bad.safetensors"));
  EXPECT_THAT(msg, HasSubstr("BOOL data has bytes other than 0 and 1"));
}

TEST(SafetensorsErrors, UnsupportedTensorsOnWrite) {
  auto msg = error_of([] { serialize_safetensors({{"c", torch::ones(2, torch::kComplexFloat)}}); });
  EXPECT_THAT(msg, HasSubstr("tensor 'c' has unsupported dtype"));
  msg = error_of([] { serialize_safetensors({{"u", torch::Tensor()}}); });
  EXPECT_THAT(msg, HasSubstr("tensor 'u' is undefined"));
}

TEST(SafetensorsErrors, MissingFile) {
  const auto msg = error_of([] { read_safetensors("/nonexistent/dir/m.safetensors"); });
  EXPECT_THAT(msg, HasSubstr("/nonexistent/dir/m.safetensors"));
  EXPECT_THAT(msg, HasSubstr("No such file or directory"));
}

// ---- atomic writes ----

TEST(AtomicFile, WritesAndReplaces) {
  TempDir dir;
  const std::string path = dir.file("f.bin");
  write_file_atomic(path, std::string("one\0two", 7));
  EXPECT_EQ(read_file(path), std::string("one\0two", 7));
  ::chmod(path.c_str(), 0640);
  write_file_atomic(path, "replaced");
  EXPECT_EQ(read_file(path), "replaced");
  struct stat st;
  ASSERT_EQ(::stat(path.c_str(), &st), 0);
  EXPECT_EQ(st.st_mode & 0777, 0640u);  // permissions of the replaced file are kept
  write_file_atomic(path, "");
  EXPECT_EQ(read_file(path), "");
  EXPECT_EQ(dir.list(), std::vector<std::string>{"f.bin"});
}

TEST(AtomicFile, TargetIsADirectory) {
  TempDir dir;
  fs::create_directory(dir.file("sub"));
  write_file_atomic(dir.file("sub/keep"), "kept");
  const auto msg = error_of([&] { write_file_atomic(dir.file("sub"), "data"); });
  EXPECT_THAT(msg, HasSubstr(dir.file("sub")));
  EXPECT_THAT(msg, HasSubstr("Is a directory"));
  EXPECT_EQ(dir.list(), std::vector<std::string>{"sub"});  // no temp file left behind
  EXPECT_EQ(read_file(dir.file("sub/keep")), "kept");
}

TEST(AtomicFile, MissingDirectory) {
  TempDir dir;
  const auto msg = error_of([&] { write_file_atomic(dir.file("no/such/f.bin"), "data"); });
  EXPECT_THAT(msg, HasSubstr(dir.file("no/such/f.bin")));
  EXPECT_THAT(msg, HasSubstr("No such file or directory"));
  EXPECT_TRUE(dir.list().empty());
}

TEST(AtomicFile, FailedWriteKeepsOldFile) {
  // A file size limit makes write() fail half way (EFBIG), even for root.
  TempDir dir;
  const std::string path = dir.file("model.safetensors");
  write_safetensors(path, {{"old", torch::arange(4)}});
  const std::string old_bytes = read_file(path);

  struct rlimit saved;
  ASSERT_EQ(::getrlimit(RLIMIT_FSIZE, &saved), 0);
  auto old_handler = ::signal(SIGXFSZ, SIG_IGN);
  struct rlimit small = saved;
  small.rlim_cur = 4096;
  ASSERT_EQ(::setrlimit(RLIMIT_FSIZE, &small), 0);
  const auto msg = error_of([&] { write_safetensors(path, {{"new", torch::zeros({10000})}}); });
  ::setrlimit(RLIMIT_FSIZE, &saved);
  ::signal(SIGXFSZ, old_handler);

  EXPECT_THAT(msg, HasSubstr(path));
  EXPECT_THAT(msg, HasSubstr("File too large"));
  EXPECT_EQ(read_file(path), old_bytes);
  EXPECT_EQ(dir.list(), std::vector<std::string>{"model.safetensors"});
}

TEST(AtomicFile, ReadOnlyDirectory) {
  if (::geteuid() == 0) GTEST_SKIP() << "root ignores directory permissions";
  TempDir dir;
  const std::string path = dir.file("f.bin");
  write_file_atomic(path, "old");
  ASSERT_EQ(::chmod(dir.path().c_str(), 0500), 0);
  const auto msg = error_of([&] { write_file_atomic(path, "new"); });
  ::chmod(dir.path().c_str(), 0700);
  EXPECT_THAT(msg, HasSubstr(path));
  EXPECT_THAT(msg, HasSubstr("Permission denied"));
  EXPECT_EQ(read_file(path), "old");
  EXPECT_EQ(dir.list(), std::vector<std::string>{"f.bin"});
}

TEST(AtomicFile, ReadFileErrorsNameThePath) {
  TempDir dir;
  auto msg = error_of([&] { read_file(dir.file("missing")); });
  EXPECT_THAT(msg, HasSubstr(dir.file("missing")));
  EXPECT_THAT(msg, HasSubstr("No such file or directory"));
  msg = error_of([&] { read_file(dir.path()); });
  EXPECT_THAT(msg, HasSubstr(dir.path()));
  EXPECT_THAT(msg, HasSubstr("Is a directory"));
}
