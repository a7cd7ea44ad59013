// The checkpoint file format (docs/checkpoint-format.md): what an optimizer saves, its binary
// encoding with checksums, and atomic writing. Independent of the optimizer objects, so the
// parser can be fuzzed on its own.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "fusedopt/types.hpp"

namespace fo::detail {

inline constexpr std::uint32_t kCheckpointVersion = 1;

struct CheckpointParam {
  std::string name;
  DType dtype = DType::f32;
  std::vector<std::int64_t> shape;
  std::int64_t step = 0;
  std::vector<std::pair<std::string, double>> overrides;  // per-param options
};

/// One state buffer of one param: float32 values (f32, or bf16 states, which widen exactly),
/// or (dtype q8, q4) a quantized state's buffer as it is, its bytes zero-padded to whole
/// float32 values.
struct CheckpointTensor {
  std::string param;
  std::string state;
  std::vector<float> values;
  DType dtype = DType::f32;
};

struct CheckpointData {
  std::string algorithm;
  std::vector<std::pair<std::string, double>> options;  // defaults and step settings
  std::vector<CheckpointParam> params;
  std::vector<CheckpointTensor> tensors;
};

/// The file's bytes.
std::vector<unsigned char> encode_checkpoint(const CheckpointData& data);

/// Parses and verifies a whole file image: magic, version, byte order, header checksum,
/// every field's bounds, each tensor's extent and checksum. Throws fo::Error (corrupt_data,
/// or unsupported for a newer version) naming what is wrong; never reads out of bounds.
CheckpointData decode_checkpoint(const unsigned char* bytes, std::size_t size);

/// Writes atomically: a temporary file in the same folder, flushed and fsynced, renamed over
/// `path`, then the folder fsynced. A failure at any point leaves `path` as it was and
/// removes the temporary file. Throws fo::Error (io_error).
void write_file_atomically(const std::string& path, const std::vector<unsigned char>& bytes);

std::vector<unsigned char> read_file(const std::string& path);

/// Test hook: the next write_file_atomically fails after writing this many bytes (-1: off).
void fail_next_write_after(long long bytes);

}  // namespace fo::detail
