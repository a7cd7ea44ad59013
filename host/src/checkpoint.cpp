// Checkpoint encoding, verification and atomic file writing; layout in
// docs/checkpoint-format.md. Checksums are XXH64 (Debian's libxxhash, header-only mode).
#include "checkpoint.hpp"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <string>

#define XXH_INLINE_ALL
#include <xxhash.h>

namespace fo::detail {
namespace {

constexpr char kMagic[8] = {'F', 'U', 'S', 'E', 'D', 'O', 'P', 'T'};
constexpr std::uint32_t kByteOrderMark = 0x01020304u;
constexpr std::size_t kPreamble = 32;  // magic, version, byte order, header size, header hash
constexpr std::size_t kAlign = 64;
// Bounds a corrupted header cannot exceed without being called corrupt.
constexpr std::uint32_t kMaxString = 4096;
constexpr std::uint32_t kMaxCount = 1u << 20;
constexpr std::uint32_t kMaxDims = 16;

[[noreturn]] void corrupt(const std::string& what) {
  throw Error(StatusCode::corrupt_data, "corrupt checkpoint: " + what);
}

std::uint64_t hash(const void* p, std::size_t n) { return XXH64(p, n, 0); }

class Writer {
 public:
  std::vector<unsigned char> out;
  template <class T>
  void pod(T v) {
    const auto* p = reinterpret_cast<const unsigned char*>(&v);
    out.insert(out.end(), p, p + sizeof v);
  }
  void str(const std::string& s) {
    pod(static_cast<std::uint32_t>(s.size()));
    out.insert(out.end(), s.begin(), s.end());
  }
  void pairs(const std::vector<std::pair<std::string, double>>& v) {
    pod(static_cast<std::uint32_t>(v.size()));
    for (const auto& [k, x] : v) {
      str(k);
      pod(x);
    }
  }
};

class Reader {
 public:
  Reader(const unsigned char* p, std::size_t n) : p_(p), n_(n) {}
  template <class T>
  T pod(const char* what) {
    if (n_ - pos_ < sizeof(T)) corrupt(std::string("header ends inside ") + what);
    T v;
    std::memcpy(&v, p_ + pos_, sizeof v);
    pos_ += sizeof v;
    return v;
  }
  std::uint32_t count(const char* what) {
    const auto c = pod<std::uint32_t>(what);
    if (c > kMaxCount) corrupt(std::string(what) + " count " + std::to_string(c) + " is absurd");
    return c;
  }
  std::string str(const char* what) {
    const auto len = pod<std::uint32_t>(what);
    if (len > kMaxString || n_ - pos_ < len) corrupt(std::string("bad length of ") + what);
    std::string s(reinterpret_cast<const char*>(p_ + pos_), len);
    pos_ += len;
    return s;
  }
  std::vector<std::pair<std::string, double>> pairs(const char* what) {
    std::vector<std::pair<std::string, double>> v(count(what));
    for (auto& [k, x] : v) {
      k = str(what);
      x = pod<double>(what);
      if (!std::isfinite(x)) corrupt(std::string("non-finite value of ") + k);
    }
    return v;
  }
  bool done() const { return pos_ == n_; }

 private:
  const unsigned char* p_;
  std::size_t n_;
  std::size_t pos_ = 0;
};

std::atomic<long long> g_fail_after{-1};

}  // namespace

void fail_next_write_after(long long bytes) { g_fail_after.store(bytes); }

std::vector<unsigned char> encode_checkpoint(const CheckpointData& d) {
  Writer h;
  h.str(d.algorithm);
  h.pairs(d.options);
  h.pod(static_cast<std::uint32_t>(d.params.size()));
  for (const auto& p : d.params) {
    h.str(p.name);
    h.pod(static_cast<std::uint32_t>(p.dtype));
    h.pod(static_cast<std::uint32_t>(p.shape.size()));
    for (auto x : p.shape) h.pod(x);
    h.pod(p.step);
    h.pairs(p.overrides);
  }
  // Tensor table: offsets are known once the header's size is, and the header's size does
  // not depend on the offsets' values (fixed-width fields).
  h.pod(static_cast<std::uint32_t>(d.tensors.size()));
  std::vector<std::size_t> offset_slots;
  for (const auto& t : d.tensors) {
    h.str(t.param);
    h.str(t.state);
    h.pod(static_cast<std::uint32_t>(t.dtype));
    offset_slots.push_back(h.out.size());
    h.pod(std::uint64_t{0});  // offset
    h.pod(static_cast<std::uint64_t>(t.values.size() * sizeof(float)));
    h.pod(hash(t.values.data(), t.values.size() * sizeof(float)));
  }
  const std::size_t size_slot = h.out.size();
  h.pod(std::uint64_t{0});  // file size

  std::size_t at = (kPreamble + h.out.size() + kAlign - 1) / kAlign * kAlign;
  for (std::size_t i = 0; i < d.tensors.size(); ++i) {
    const std::uint64_t off = at;
    std::memcpy(h.out.data() + offset_slots[i], &off, sizeof off);
    at = (at + d.tensors[i].values.size() * sizeof(float) + kAlign - 1) / kAlign * kAlign;
  }
  const std::uint64_t file_size = at;
  std::memcpy(h.out.data() + size_slot, &file_size, sizeof file_size);

  std::vector<unsigned char> file(file_size, 0);
  std::memcpy(file.data(), kMagic, 8);
  const std::uint32_t version = kCheckpointVersion, bom = kByteOrderMark;
  const std::uint64_t header_size = h.out.size(), header_hash = hash(h.out.data(), h.out.size());
  std::memcpy(file.data() + 8, &version, 4);
  std::memcpy(file.data() + 12, &bom, 4);
  std::memcpy(file.data() + 16, &header_size, 8);
  std::memcpy(file.data() + 24, &header_hash, 8);
  std::memcpy(file.data() + kPreamble, h.out.data(), h.out.size());
  for (std::size_t i = 0; i < d.tensors.size(); ++i) {
    std::uint64_t off;
    std::memcpy(&off, h.out.data() + offset_slots[i], sizeof off);
    if (!d.tensors[i].values.empty())  // memcpy from null is undefined even for 0 bytes
      std::memcpy(file.data() + off, d.tensors[i].values.data(),
                  d.tensors[i].values.size() * sizeof(float));
  }
  return file;
}

CheckpointData decode_checkpoint(const unsigned char* bytes, std::size_t size) {
  if (size < kPreamble) corrupt("the file is " + std::to_string(size) + " bytes, too short");
  if (std::memcmp(bytes, kMagic, 8) != 0) corrupt("wrong magic: not a fusedopt checkpoint");
  std::uint32_t version, bom;
  std::uint64_t header_size, header_hash;
  std::memcpy(&version, bytes + 8, 4);
  std::memcpy(&bom, bytes + 12, 4);
  std::memcpy(&header_size, bytes + 16, 8);
  std::memcpy(&header_hash, bytes + 24, 8);
  if (bom != kByteOrderMark) corrupt("written on a machine of the other byte order");
  if (version > kCheckpointVersion)
    throw Error(StatusCode::unsupported, "checkpoint format version " + std::to_string(version) +
                                             " is newer than this library's (" +
                                             std::to_string(kCheckpointVersion) + ")");
  if (version == 0) corrupt("format version 0");
  if (header_size > size - kPreamble)
    corrupt("the header runs past the end of the file (truncated?)");
  const unsigned char* header = bytes + kPreamble;
  if (hash(header, header_size) != header_hash) corrupt("header checksum mismatch");

  Reader r(header, header_size);
  CheckpointData d;
  d.algorithm = r.str("algorithm");
  d.options = r.pairs("options");
  d.params.resize(r.count("params"));
  for (auto& p : d.params) {
    p.name = r.str("param name");
    const auto dtype = r.pod<std::uint32_t>("param dtype");
    if (dtype > static_cast<std::uint32_t>(DType::i64))
      corrupt("param dtype " + std::to_string(dtype));
    p.dtype = static_cast<DType>(dtype);
    const auto ndim = r.pod<std::uint32_t>("param ndim");
    if (ndim > kMaxDims) corrupt("param '" + p.name + "' has " + std::to_string(ndim) + " dims");
    for (std::uint32_t i = 0; i < ndim; ++i) {
      const auto x = r.pod<std::int64_t>("param shape");
      if (x < 0) corrupt("param '" + p.name + "' has a negative dimension");
      p.shape.push_back(x);
    }
    p.step = r.pod<std::int64_t>("param step");
    if (p.step < 0) corrupt("param '" + p.name + "' has a negative step count");
    p.overrides = r.pairs("param overrides");
  }
  const std::uint32_t ntensors = r.count("tensors");
  struct Extent {
    std::uint64_t offset, bytes, hash;
  };
  std::vector<Extent> extents(ntensors);
  d.tensors.resize(ntensors);
  for (std::uint32_t i = 0; i < ntensors; ++i) {
    d.tensors[i].param = r.str("tensor param");
    d.tensors[i].state = r.str("tensor state");
    const auto dtype = r.pod<std::uint32_t>("tensor dtype");
    if (dtype != static_cast<std::uint32_t>(DType::f32) &&
        dtype != static_cast<std::uint32_t>(DType::q8) &&
        dtype != static_cast<std::uint32_t>(DType::q4))
      corrupt("tensor dtype " + std::to_string(dtype) + " is not float32 or a quantized state's");
    d.tensors[i].dtype = static_cast<DType>(dtype);
    extents[i] = {r.pod<std::uint64_t>("tensor offset"), r.pod<std::uint64_t>("tensor size"),
                  r.pod<std::uint64_t>("tensor checksum")};
  }
  const auto file_size = r.pod<std::uint64_t>("file size");
  if (!r.done()) corrupt("trailing bytes in the header");
  if (file_size != size)
    corrupt("the file is " + std::to_string(size) + " bytes, its header says " +
            std::to_string(file_size) + " (truncated or extended)");
  const std::uint64_t payload_start = kPreamble + header_size;
  std::uint64_t previous_end = payload_start;
  // The padding carries nothing and must be zero, so that every byte of the file is checked
  // (a flipped bit there would otherwise load silently).
  const auto expect_zero_padding = [&](std::uint64_t from, std::uint64_t to) {
    for (std::uint64_t at = from; at < to; ++at)
      if (bytes[at] != 0) corrupt("non-zero padding at byte " + std::to_string(at));
  };
  for (std::uint32_t i = 0; i < ntensors; ++i) {
    const Extent& e = extents[i];
    const std::string who = "tensor " + d.tensors[i].param + "/" + d.tensors[i].state;
    if (e.offset % kAlign != 0 || e.bytes % sizeof(float) != 0) corrupt(who + " is misaligned");
    if (e.offset < previous_end || e.offset > size || e.bytes > size - e.offset)
      corrupt(who + " lies outside the payload or overlaps another");
    expect_zero_padding(previous_end, e.offset);
    previous_end = e.offset + e.bytes;
    if (hash(bytes + e.offset, e.bytes) != e.hash) corrupt(who + ": checksum mismatch");
    d.tensors[i].values.resize(e.bytes / sizeof(float));
    if (e.bytes > 0) std::memcpy(d.tensors[i].values.data(), bytes + e.offset, e.bytes);
  }
  expect_zero_padding(previous_end, size);
  return d;
}

namespace {

[[noreturn]] void io_fail(const std::string& what, int err) {
  throw Error(StatusCode::io_error, what + ": " + std::strerror(err));
}

void write_all(int fd, const unsigned char* p, std::size_t n, const std::string& tmp) {
  const long long fail_after = g_fail_after.exchange(-1);
  const std::size_t limit =
      fail_after >= 0 ? std::min<std::size_t>(n, static_cast<std::size_t>(fail_after)) : n;
  std::size_t done = 0;
  while (done < limit) {
    const ssize_t w = ::write(fd, p + done, limit - done);
    if (w < 0) {
      if (errno == EINTR) continue;
      io_fail("writing " + tmp, errno);
    }
    done += static_cast<std::size_t>(w);
  }
  if (fail_after >= 0) io_fail("writing " + tmp + " (an injected failure)", EIO);
}

}  // namespace

void write_file_atomically(const std::string& path, const std::vector<unsigned char>& bytes) {
  const std::size_t slash = path.find_last_of('/');
  const std::string dir =
      slash == std::string::npos ? "." : (slash == 0 ? "/" : path.substr(0, slash));
  std::string tmp = path + ".tmp.XXXXXX";
  int fd = ::mkstemp(tmp.data());
  if (fd < 0) io_fail("creating a temporary file beside " + path, errno);
  try {
    write_all(fd, bytes.data(), bytes.size(), tmp);
    if (::fsync(fd) != 0) io_fail("fsync of " + tmp, errno);
    const int closed = ::close(fd);
    fd = -1;  // closed either way: never close it (or a reused descriptor) twice
    if (closed != 0) io_fail("closing " + tmp, errno);
  } catch (...) {
    if (fd >= 0) ::close(fd);
    ::unlink(tmp.c_str());
    throw;
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    const int err = errno;
    ::unlink(tmp.c_str());
    io_fail("renaming " + tmp + " to " + path, err);
  }
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY);
  if (dfd >= 0) {  // the rename itself durable; a failure here loses nothing already written
    ::fsync(dfd);
    ::close(dfd);
  }
}

std::vector<unsigned char> read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) io_fail("opening " + path, errno);
  std::vector<unsigned char> out;
  struct stat st {};
  if (::fstat(fd, &st) == 0 && st.st_size > 0) out.reserve(static_cast<std::size_t>(st.st_size));
  unsigned char buf[1 << 16];
  for (;;) {
    const ssize_t n = ::read(fd, buf, sizeof buf);
    if (n < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      ::close(fd);
      io_fail("reading " + path, err);
    }
    if (n == 0) break;
    out.insert(out.end(), buf, buf + n);
  }
  ::close(fd);
  return out;
}

}  // namespace fo::detail
