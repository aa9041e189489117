// Wire format of the tensor pipeline (see wire.h).
#include "wire.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <limits>
#include <set>
#include <utility>

namespace torchspec {
namespace pipeline {

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__, "the wire format is written with host-order memcpy");

namespace {

constexpr int64_t kEntryFixedBytes = 24;  // dtype, ndim, name_len, pad, offset, nbytes

int64_t align_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

template <class T>
void put(uint8_t*& p, T value) {
  std::memcpy(p, &value, sizeof(T));
  p += sizeof(T);
}

// Reads from [p, end) or throws: a header is never trusted to be as long as it claims.
struct Reader {
  const uint8_t* p;
  const uint8_t* end;

  template <class T>
  T get(const char* what) {
    if (end - p < static_cast<std::ptrdiff_t>(sizeof(T))) {
      throw HeaderError(std::string("pipeline header truncated while reading ") + what);
    }
    T value;
    std::memcpy(&value, p, sizeof(T));
    p += sizeof(T);
    return value;
  }
};

int64_t entry_bytes(const TensorEntry& e) {
  return kEntryFixedBytes + 8 * static_cast<int64_t>(e.shape.size()) + static_cast<int64_t>(e.name.size());
}

// numel * element size, or -1 on overflow or a negative dimension.
int64_t checked_nbytes(const std::vector<int64_t>& shape, int64_t elem) {
  int64_t n = elem;
  for (int64_t d : shape) {
    if (d < 0) return -1;
    if (d != 0 && n > std::numeric_limits<int64_t>::max() / d) return -1;
    n *= d;
  }
  return n;
}

}  // namespace

int64_t element_size(WireDtype dtype) {
  switch (dtype) {
    case WireDtype::kFloat64:
    case WireDtype::kInt64:
      return 8;
    case WireDtype::kFloat32:
    case WireDtype::kInt32:
      return 4;
    case WireDtype::kBFloat16:
    case WireDtype::kFloat16:
    case WireDtype::kInt16:
      return 2;
    case WireDtype::kInt8:
    case WireDtype::kUInt8:
    case WireDtype::kBool:
      return 1;
  }
  throw HeaderError("pipeline header: unknown dtype code " + std::to_string(static_cast<int>(dtype)));
}

BatchLayout plan_batch(uint64_t seq, std::vector<TensorEntry> entries) {
  BatchLayout layout;
  layout.seq = seq;
  int64_t header = kPrefixBytes;
  std::set<std::string> names;
  for (const TensorEntry& e : entries) {
    if (e.shape.size() > static_cast<size_t>(kMaxDims)) {
      throw std::invalid_argument("pipeline: tensor '" + e.name + "' has " + std::to_string(e.shape.size()) +
                                  " dimensions, at most " + std::to_string(kMaxDims) + " are supported");
    }
    if (e.name.size() > 0xffff) throw std::invalid_argument("pipeline: a tensor name is longer than 65535 bytes");
    if (!names.insert(e.name).second) throw std::invalid_argument("pipeline: duplicate tensor name '" + e.name + "'");
    header += entry_bytes(e);
  }
  if (entries.size() > 0xffffffffu || header > 0xffffffffLL) throw std::invalid_argument("pipeline: header too large");
  layout.header_bytes = align_up(header);
  for (TensorEntry& e : entries) {
    e.nbytes = checked_nbytes(e.shape, element_size(e.dtype));
    if (e.nbytes < 0) throw std::invalid_argument("pipeline: tensor '" + e.name + "' has a negative or huge shape");
  }
  int64_t offset = layout.header_bytes;
  for (const bool small : {true, false}) {
    for (TensorEntry& e : entries) {
      if ((e.nbytes < kSmallBytes) != small) continue;
      e.offset = offset;
      offset = align_up(offset + e.nbytes);
    }
  }
  layout.total_bytes = offset;
  layout.entries = std::move(entries);
  return layout;
}

void encode_header(const BatchLayout& layout, uint8_t* buffer) {
  uint8_t* p = buffer;
  put<uint32_t>(p, kMagic);
  put<uint16_t>(p, kVersion);
  put<uint16_t>(p, 0);
  put<uint32_t>(p, static_cast<uint32_t>(layout.entries.size()));
  put<uint32_t>(p, static_cast<uint32_t>(layout.header_bytes));
  put<uint64_t>(p, layout.seq);
  put<uint64_t>(p, static_cast<uint64_t>(layout.total_bytes));
  for (const TensorEntry& e : layout.entries) {
    put<uint8_t>(p, static_cast<uint8_t>(e.dtype));
    put<uint8_t>(p, static_cast<uint8_t>(e.shape.size()));
    put<uint16_t>(p, static_cast<uint16_t>(e.name.size()));
    put<uint32_t>(p, 0);
    put<uint64_t>(p, static_cast<uint64_t>(e.offset));
    put<uint64_t>(p, static_cast<uint64_t>(e.nbytes));
    for (int64_t d : e.shape) put<int64_t>(p, d);
    std::memcpy(p, e.name.data(), e.name.size());
    p += e.name.size();
  }
  std::memset(p, 0, static_cast<size_t>(buffer + layout.header_bytes - p));
}

void decode_prefix(const uint8_t* data, int64_t size, int64_t* header_bytes, int64_t* total_bytes) {
  Reader r{data, data + size};
  const uint32_t magic = r.get<uint32_t>("magic");
  if (magic != kMagic) {
    throw HeaderError("pipeline header: bad magic 0x" + [&] {
      char text[16];
      std::snprintf(text, sizeof(text), "%08x", magic);
      return std::string(text);
    }() + " (not a torchspec_ext pipeline batch, or the streams are out of step)");
  }
  const uint16_t version = r.get<uint16_t>("version");
  if (version != kVersion) {
    throw HeaderError("pipeline header: version " + std::to_string(version) + ", this build reads version " +
                      std::to_string(kVersion) + " (teacher and trainer run different torchspec_ext builds)");
  }
  r.get<uint16_t>("reserved");
  r.get<uint32_t>("count");
  const uint32_t header = r.get<uint32_t>("header_bytes");
  r.get<uint64_t>("seq");
  const uint64_t total = r.get<uint64_t>("total_bytes");
  if (header < kPrefixBytes || header % kAlign != 0 || total < header ||
      total > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
    throw HeaderError("pipeline header: inconsistent sizes (header " + std::to_string(header) + " B, total " +
                      std::to_string(total) + " B)");
  }
  *header_bytes = header;
  *total_bytes = static_cast<int64_t>(total);
}

BatchLayout decode_header(const uint8_t* data, int64_t size) {
  BatchLayout layout;
  decode_prefix(data, size, &layout.header_bytes, &layout.total_bytes);
  if (layout.header_bytes > size) {
    throw HeaderError("pipeline header: claims " + std::to_string(layout.header_bytes) + " bytes, got " +
                      std::to_string(size));
  }
  Reader r{data + 8, data + layout.header_bytes};
  const uint32_t count = r.get<uint32_t>("count");
  r.get<uint32_t>("header_bytes");
  layout.seq = r.get<uint64_t>("seq");
  r.get<uint64_t>("total_bytes");
  std::vector<std::pair<int64_t, int64_t>> spans;  // (offset, end) of every entry, checked for overlap below
  for (uint32_t i = 0; i < count; ++i) {
    TensorEntry e;
    const uint8_t dtype = r.get<uint8_t>("dtype");
    if (dtype >= kNumWireDtypes) throw HeaderError("pipeline header: unknown dtype code " + std::to_string(dtype));
    e.dtype = static_cast<WireDtype>(dtype);
    const uint8_t ndim = r.get<uint8_t>("ndim");
    if (ndim > kMaxDims) throw HeaderError("pipeline header: " + std::to_string(ndim) + " dimensions");
    const uint16_t name_len = r.get<uint16_t>("name length");
    r.get<uint32_t>("reserved");
    e.offset = static_cast<int64_t>(r.get<uint64_t>("offset"));
    e.nbytes = static_cast<int64_t>(r.get<uint64_t>("nbytes"));
    for (int d = 0; d < ndim; ++d) e.shape.push_back(r.get<int64_t>("shape"));
    if (r.end - r.p < name_len) throw HeaderError("pipeline header truncated while reading a name");
    e.name.assign(reinterpret_cast<const char*>(r.p), name_len);
    r.p += name_len;
    // Entries lie after the header inside the buffer, with sizes that match their shapes.
    if (e.offset < layout.header_bytes || e.offset % kAlign != 0 || e.nbytes < 0 ||
        e.nbytes > layout.total_bytes - e.offset || checked_nbytes(e.shape, element_size(e.dtype)) != e.nbytes) {
      throw HeaderError("pipeline header: entry '" + e.name + "' (offset " + std::to_string(e.offset) + ", " +
                        std::to_string(e.nbytes) + " B) does not fit its shape or the " +
                        std::to_string(layout.total_bytes) + " B buffer");
    }
    spans.emplace_back(e.offset, e.offset + e.nbytes);
    layout.entries.push_back(std::move(e));
  }
  std::sort(spans.begin(), spans.end());
  for (size_t i = 1; i < spans.size(); ++i) {
    if (spans[i].first < spans[i - 1].second) {
      throw HeaderError("pipeline header: two entries overlap at offset " + std::to_string(spans[i].first));
    }
  }
  return layout;
}

void pack_host(const BatchLayout& layout, const void* const* sources, uint8_t* buffer) {
  encode_header(layout, buffer);
  for (size_t i = 0; i < layout.entries.size(); ++i) {
    const TensorEntry& e = layout.entries[i];
    if (e.nbytes > 0) std::memcpy(buffer + e.offset, sources[i], static_cast<size_t>(e.nbytes));
  }
}

}  // namespace pipeline
}  // namespace torchspec
