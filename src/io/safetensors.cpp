#include "dynattn/io/safetensors.h"

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cstring>
#include <limits>
#include <set>

#include "dynattn/io/atomic_file.h"

// Tensor bytes are copied verbatim between memory and the file, whose byte order is little
// endian.
#if defined(__BYTE_ORDER__)
static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "safetensors I/O assumes little endian");
#endif

namespace dynattn {
namespace {

// ordered_json keeps the header's key order, which becomes the order of the tensors read.
using Json = nlohmann::ordered_json;

constexpr uint64_t kMaxHeaderBytes = 100'000'000;  // the reference's limit
constexpr const char* kMetadataKey = "__metadata__";

struct DType {
  const char* name;
  torch::ScalarType type;
};
constexpr DType kDTypes[] = {
    {"F64", torch::kFloat64},   {"F32", torch::kFloat32}, {"F16", torch::kFloat16},
    {"BF16", torch::kBFloat16}, {"I64", torch::kInt64},   {"I32", torch::kInt32},
    {"I16", torch::kInt16},     {"I8", torch::kInt8},     {"U8", torch::kUInt8},
    {"BOOL", torch::kBool},
};

const DType* dtype_by_name(const std::string& name) {
  for (const auto& d : kDTypes) {
    if (name == d.name) return &d;
  }
  return nullptr;
}

const DType* dtype_by_type(torch::ScalarType type) {
  for (const auto& d : kDTypes) {
    if (type == d.type) return &d;
  }
  return nullptr;
}

// A non-negative JSON integer as uint64, or false.
bool as_unsigned(const Json& j, uint64_t* out) {
  if (j.is_number_unsigned()) {
    *out = j.get<uint64_t>();
    return true;
  }
  if (j.is_number_integer() && j.get<int64_t>() >= 0) {
    *out = static_cast<uint64_t>(j.get<int64_t>());
    return true;
  }
  return false;
}

struct Entry {
  std::string name;
  const DType* dtype;
  std::vector<int64_t> shape;
  uint64_t begin, end;
};

Entry parse_entry(const std::string& origin, const std::string& name, const Json& j,
                  uint64_t data_size) {
  const std::string where = "safetensors: " + origin + ": tensor '" + name + "'";
  TORCH_CHECK(j.is_object(), where, ": entry must be a JSON object, got ", j.dump());
  for (const char* key : {"dtype", "shape", "data_offsets"}) {
    TORCH_CHECK(j.contains(key), where, ": missing '", key, "'");
  }
  Entry e;
  e.name = name;

  const Json& dtype = j.at("dtype");
  TORCH_CHECK(dtype.is_string(), where, ": 'dtype' must be a string, got ", dtype.dump());
  e.dtype = dtype_by_name(dtype.get<std::string>());
  TORCH_CHECK(e.dtype, where, ": unknown dtype '", dtype.get<std::string>(), "'");

  const Json& shape = j.at("shape");
  TORCH_CHECK(shape.is_array(), where, ": 'shape' must be an array of integers, got ",
              shape.dump());
  uint64_t numel = 1;
  for (const Json& d : shape) {
    TORCH_CHECK(d.is_number_integer(), where, ": 'shape' must be an array of integers, got ",
                shape.dump());
    uint64_t dim = 0;
    TORCH_CHECK(as_unsigned(d, &dim), where, ": negative dimension ", d.dump(), " in shape ",
                shape.dump());
    TORCH_CHECK(dim <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()) &&
                    !__builtin_mul_overflow(numel, dim, &numel),
                where, ": shape ", shape.dump(), " is too large");
    e.shape.push_back(static_cast<int64_t>(dim));
  }
  const uint64_t elem = c10::elementSize(e.dtype->type);
  uint64_t nbytes = 0;
  TORCH_CHECK(!__builtin_mul_overflow(numel, elem, &nbytes), where, ": shape ", shape.dump(),
              " is too large");

  const Json& offsets = j.at("data_offsets");
  TORCH_CHECK(offsets.is_array() && offsets.size() == 2 && as_unsigned(offsets[0], &e.begin) &&
                  as_unsigned(offsets[1], &e.end),
              where, ": 'data_offsets' must be [begin, end] with non-negative integers, got ",
              offsets.dump());
  TORCH_CHECK(e.begin <= e.end, where, ": data_offsets ", offsets.dump(), " have begin > end");
  TORCH_CHECK(e.end <= data_size, where, ": data_offsets ", offsets.dump(),
              " reach beyond the data buffer of ", data_size, " bytes");
  TORCH_CHECK(e.end - e.begin == nbytes, where, ": data_offsets ", offsets.dump(), " span ",
              e.end - e.begin, " bytes but shape ", shape.dump(), " of ", e.dtype->name, " needs ",
              nbytes);
  return e;
}

// Like the reference reader: the tensors must tile the data buffer exactly, so that every
// byte of the file has one meaning (no hidden payloads, no aliasing between tensors).
void check_tiling(const std::string& origin, std::vector<const Entry*> entries,
                  uint64_t data_size) {
  std::stable_sort(entries.begin(), entries.end(), [](const Entry* a, const Entry* b) {
    return std::make_pair(a->begin, a->end) < std::make_pair(b->begin, b->end);
  });
  uint64_t covered = 0;
  const Entry* prev = nullptr;
  for (const Entry* e : entries) {
    TORCH_CHECK(e->begin >= covered, "safetensors: ", origin, ": tensors '", prev->name, "' and '",
                e->name, "' overlap (bytes [", prev->begin, ", ", prev->end, ") and [", e->begin,
                ", ", e->end, "))");
    TORCH_CHECK(e->begin == covered, "safetensors: ", origin, ": bytes [", covered, ", ", e->begin,
                ") of the data buffer are not covered by any tensor");
    covered = e->end;
    prev = e;
  }
  TORCH_CHECK(covered == data_size, "safetensors: ", origin, ": bytes [", covered, ", ", data_size,
              ") of the data buffer are not covered by any tensor");
}

std::map<std::string, std::string> parse_metadata(const std::string& origin, const Json& j) {
  TORCH_CHECK(j.is_object(), "safetensors: ", origin, ": '", kMetadataKey,
              "' must be an object of strings, got ", j.dump());
  std::map<std::string, std::string> metadata;
  for (const auto& item : j.items()) {
    TORCH_CHECK(item.value().is_string(), "safetensors: ", origin, ": ", kMetadataKey,
                " value for '", item.key(), "' is not a string: ", item.value().dump());
    metadata[item.key()] = item.value().get<std::string>();
  }
  return metadata;
}

// `where` prefixes errors: "safetensors" or "safetensors: <path>".
std::string serialize(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                      const std::map<std::string, std::string>& metadata,
                      const std::string& where) {
  Json header = Json::object();
  if (!metadata.empty()) header[kMetadataKey] = metadata;
  std::vector<torch::Tensor> cpu;
  std::set<std::string> names;
  uint64_t offset = 0;
  for (const auto& [name, tensor] : tensors) {
    TORCH_CHECK(name != kMetadataKey, where, ": cannot write a tensor named '", name,
                "': the name is reserved for metadata");
    TORCH_CHECK(names.insert(name).second, where, ": tensor name '", name, "' given twice");
    TORCH_CHECK(tensor.defined(), where, ": tensor '", name, "' is undefined");
    TORCH_CHECK(tensor.layout() == torch::kStrided, where, ": tensor '", name,
                "' must be dense, got layout ", tensor.layout());
    const DType* dtype = dtype_by_type(tensor.scalar_type());
    TORCH_CHECK(dtype, where, ": tensor '", name, "' has unsupported dtype ", tensor.scalar_type());
    auto t = tensor.detach().to(torch::kCPU).contiguous();
    const uint64_t nbytes = t.numel() * t.element_size();
    header[name] = {{"dtype", dtype->name},
                    {"shape", t.sizes().vec()},
                    {"data_offsets", {offset, offset + nbytes}}};
    offset += nbytes;
    cpu.push_back(std::move(t));
  }
  std::string json = header.dump();
  json.append((8 - json.size() % 8) % 8, ' ');  // keeps the data buffer 8-byte aligned

  std::string out;
  out.reserve(8 + json.size() + offset);
  for (int i = 0; i < 8; ++i) out.push_back(static_cast<char>((json.size() >> (8 * i)) & 0xff));
  out += json;
  for (const auto& t : cpu) {
    if (t.numel() > 0) {
      out.append(static_cast<const char*>(t.data_ptr()), t.numel() * t.element_size());
    }
  }
  return out;
}

}  // namespace

const torch::Tensor* SafetensorsFile::find(const std::string& name) const {
  for (const auto& [n, t] : tensors) {
    if (n == name) return &t;
  }
  return nullptr;
}

std::map<std::string, torch::Tensor> SafetensorsFile::as_map() const {
  return {tensors.begin(), tensors.end()};
}

SafetensorsFile parse_safetensors(const std::string& bytes, const std::string& origin) {
  TORCH_CHECK(bytes.size() >= 8, "safetensors: ", origin, ": file is ", bytes.size(),
              " bytes, shorter than the 8-byte header length");
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<uint8_t>(bytes[i]);
  TORCH_CHECK(header_size <= kMaxHeaderBytes, "safetensors: ", origin, ": header length ",
              header_size, " is absurd (more than ", kMaxHeaderBytes, " bytes)");
  TORCH_CHECK(header_size <= bytes.size() - 8, "safetensors: ", origin, ": header length ",
              header_size, " exceeds the ", bytes.size() - 8, " bytes after the length field");
  const char* header_begin = bytes.data() + 8;
  const char* data = header_begin + header_size;
  const uint64_t data_size = bytes.size() - 8 - header_size;

  // JSON objects silently keep one of two equal keys; a duplicate tensor name is an error.
  std::string duplicate;
  std::set<std::string> seen;
  Json::parser_callback_t on_event = [&](int depth, Json::parse_event_t event, Json& parsed) {
    if (depth == 1 && event == Json::parse_event_t::key) {
      const auto& key = parsed.get_ref<const std::string&>();
      if (!seen.insert(key).second) duplicate = key;
    }
    return true;
  };
  Json header;
  try {
    header = Json::parse(header_begin, data, on_event);
  } catch (const Json::exception& e) {
    TORCH_CHECK(false, "safetensors: ", origin, ": header is not valid JSON: ", e.what());
  }
  TORCH_CHECK(header.is_object(), "safetensors: ", origin, ": header is not a JSON object");
  TORCH_CHECK(duplicate.empty(), "safetensors: ", origin, ": name '", duplicate,
              "' appears twice in the header");

  SafetensorsFile file;
  std::vector<Entry> entries;
  for (const auto& item : header.items()) {
    if (item.key() == kMetadataKey) {
      file.metadata = parse_metadata(origin, item.value());
    } else {
      entries.push_back(parse_entry(origin, item.key(), item.value(), data_size));
    }
  }
  std::vector<const Entry*> by_offset;
  for (const auto& e : entries) by_offset.push_back(&e);
  check_tiling(origin, by_offset, data_size);

  for (const auto& e : entries) {
    auto t = torch::empty(e.shape, torch::TensorOptions().dtype(e.dtype->type));
    if (e.end > e.begin) std::memcpy(t.data_ptr(), data + e.begin, e.end - e.begin);
    if (e.dtype->type == torch::kBool) {
      // Any other byte is not a valid C++ bool and would make later arithmetic undefined.
      const auto* b = reinterpret_cast<const uint8_t*>(data + e.begin);
      TORCH_CHECK(std::all_of(b, b + (e.end - e.begin), [](uint8_t v) { return v <= 1; }),
                  "safetensors: ", origin, ": tensor '", e.name,
                  "': BOOL data has bytes other than 0 and 1");
    }
    file.tensors.emplace_back(e.name, std::move(t));
  }
  return file;
}

SafetensorsFile read_safetensors(const std::string& path) {
  return parse_safetensors(read_file(path), path);
}

std::string serialize_safetensors(const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                                  const std::map<std::string, std::string>& metadata) {
  return serialize(tensors, metadata, "safetensors");
}

void write_safetensors(const std::string& path,
                       const std::vector<std::pair<std::string, torch::Tensor>>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  write_file_atomic(path, serialize(tensors, metadata, "safetensors: " + path));
}

}  // namespace dynattn
