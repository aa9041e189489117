// Wire format of one batch of the tensor pipeline: a header (names, dtypes, shapes, offsets)
// followed by every tensor's bytes in one contiguous buffer, so that a batch is one message
// whatever its number of tensors. Framework-free: no torch, no CUDA.
//
// Buffer layout (little-endian):
//   [prefix 32 B: magic u32, version u16, 0 u16, count u32, header_bytes u32, seq u64, total_bytes u64]
//   [count entries: dtype u8, ndim u8, name_len u16, 0 u32, offset u64, nbytes u64, shape i64 x ndim, name]
//   [padding to kAlign] [the tensors under kSmallBytes, in entry order] [the others, in entry order]
// each tensor at its offset; header_bytes and every offset are multiples of kAlign; total_bytes
// is the whole buffer. Small tensors first and back to back: a transport can move them as one
// message (copied together) and each large tensor as a message from its own memory.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

namespace torchspec {
namespace pipeline {

constexpr uint32_t kMagic = 0x43505354;  // "TSPC" read as little-endian bytes
constexpr uint16_t kVersion = 2;  // 2: small tensors placed first
constexpr int64_t kAlign = 64;  // every tensor starts on a cache line (and any dtype's alignment)
constexpr int64_t kPrefixBytes = 32;
constexpr int kMaxDims = 16;
constexpr int64_t kSmallBytes = int64_t{1} << 20;  // on a CPU a message costs about a 1 MiB copy

// Element types on the wire; the Python side maps torch dtypes to these codes.
enum class WireDtype : uint8_t {
  kFloat32 = 0,
  kBFloat16 = 1,
  kFloat16 = 2,
  kFloat64 = 3,
  kInt64 = 4,
  kInt32 = 5,
  kInt16 = 6,
  kInt8 = 7,
  kUInt8 = 8,
  kBool = 9,
};
constexpr int kNumWireDtypes = 10;

// A header that cannot be what the peer sent: bad magic or version, out-of-bounds entries.
class HeaderError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

int64_t element_size(WireDtype dtype);  // throws HeaderError for an unknown code

struct TensorEntry {
  std::string name;
  WireDtype dtype = WireDtype::kUInt8;
  std::vector<int64_t> shape;
  int64_t offset = 0;  // from the start of the buffer; set by plan_batch
  int64_t nbytes = 0;  // numel * element size; set by plan_batch
};

struct BatchLayout {
  uint64_t seq = 0;
  std::vector<TensorEntry> entries;
  int64_t header_bytes = 0;
  int64_t total_bytes = 0;
};

// Places the entries (name, dtype, shape given) after the header at aligned offsets: those under
// kSmallBytes first, then the others, each group in entry order.
// Throws std::invalid_argument for negative sizes, too many dimensions or duplicate names.
BatchLayout plan_batch(uint64_t seq, std::vector<TensorEntry> entries);

// Writes the header (layout.header_bytes bytes, padding zeroed) at the start of `buffer`.
void encode_header(const BatchLayout& layout, uint8_t* buffer);

// header_bytes and total_bytes from the first kPrefixBytes of a buffer (after checking magic and version).
void decode_prefix(const uint8_t* data, int64_t size, int64_t* header_bytes, int64_t* total_bytes);

// The layout from a header of `size` bytes; checks every field against the bounds it implies.
BatchLayout decode_header(const uint8_t* data, int64_t size);

// Packs contiguous host tensors (sources[i] holds entries[i].nbytes bytes): header, then memcpy.
void pack_host(const BatchLayout& layout, const void* const* sources, uint8_t* buffer);

}  // namespace pipeline
}  // namespace torchspec
