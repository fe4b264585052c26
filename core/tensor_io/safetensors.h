// Safetensors files: a validated, memory-mapped reader and an atomic writer. No LibTorch here (the
// coordinator links this); `core/tensor_io/torch_tensors.h` converts to and from at::Tensor.
//
// Format (https://huggingface.co/docs/safetensors): u64 little-endian header length N, N bytes of
// JSON {"name": {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
// then the data section. Offsets are relative to the data section.
//
// Open() validates everything before any byte is used: the header length lies within the file, the
// JSON is well formed, every dtype is known, shape x dtype size == end - begin, every range lies
// inside the data section, and ranges are sorted by offset without overlapping. Errors are
// INVALID_ARGUMENT (malformed file) or NOT_FOUND / PERMISSION_DENIED (I/O) and name the file.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace crossdiff::tensor_io {

enum class DType { kF32, kF16, kBF16, kF64, kI64, kI32, kI16, kI8, kU8, kBool };

// "F32", "BF16", ... as written in safetensors headers.
std::string_view DTypeName(DType dtype);
absl::StatusOr<DType> ParseDType(std::string_view name);
size_t DTypeSize(DType dtype);

struct TensorInfo {
  std::string name;
  DType dtype = DType::kF32;
  std::vector<int64_t> shape;
  uint64_t begin = 0;  // byte offsets relative to the data section
  uint64_t end = 0;
  int64_t numel() const;
  uint64_t nbytes() const { return end - begin; }
};

// One memory-mapped safetensors file. Immutable after Open(); safe to share across threads.
class SafetensorsFile {
 public:
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);
  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  const std::string& path() const { return path_; }
  // Tensors in file order (sorted by offset).
  const std::vector<TensorInfo>& tensors() const { return tensors_; }
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // nullptr when absent.
  const TensorInfo* Find(std::string_view name) const;
  // NOT_FOUND naming the file and tensor when absent.
  absl::StatusOr<const TensorInfo*> Get(std::string_view name) const;
  // Pointer into the mapping; valid as long as this object lives. Not necessarily aligned.
  const uint8_t* data(const TensorInfo& info) const { return data_ + info.begin; }
  // Size of the data section in bytes (everything after the header).
  uint64_t data_size() const { return data_size_; }
  // Hint: drops this process's mapped pages of data-section bytes [begin, end) (whole pages inside
  // the range only). The file stays in the page cache and the bytes stay readable (they fault back
  // in); streaming readers call this after copying a range so resident memory does not grow with
  // the file. Never fails; safe to call concurrently with reads.
  void ReleasePages(uint64_t begin, uint64_t end) const;
  // Hint: asks the kernel to read data-section bytes [begin, end) into the page cache in the
  // background (MADV_WILLNEED), so later random reads of the range do not wait on the disk.
  // Never fails; adds nothing to resident memory.
  void PrefetchPages(uint64_t begin, uint64_t end) const;

 private:
  SafetensorsFile() = default;
  std::string path_;
  void* mapping_ = nullptr;
  size_t mapping_size_ = 0;
  const uint8_t* data_ = nullptr;
  uint64_t data_size_ = 0;
  std::vector<TensorInfo> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

// A checkpoint: one safetensors file, or a sharded one through `*.safetensors.index.json`
// ({"weight_map": {tensor: file}}), read transparently. `path` may be a file, an index file, or a
// directory holding `model.safetensors` or `model.safetensors.index.json`.
class Checkpoint {
 public:
  static absl::StatusOr<std::unique_ptr<Checkpoint>> Open(const std::string& path);

  const std::string& path() const { return path_; }
  std::vector<std::string> names() const;
  bool Contains(std::string_view name) const;
  // NOT_FOUND naming the checkpoint and tensor when absent. The pointer lives as long as this.
  absl::StatusOr<const TensorInfo*> Get(std::string_view name) const;
  // The file that holds `name` (for its data pointer).
  absl::StatusOr<const SafetensorsFile*> FileOf(std::string_view name) const;

 private:
  std::string path_;
  std::vector<std::unique_ptr<SafetensorsFile>> files_;
  std::map<std::string, size_t, std::less<>> where_;  // tensor -> index into files_
};

// Collects tensors and writes one safetensors file atomically (to `path.tmp-<pid>`, fsync, rename),
// so a reader never sees a half-written file. Tensors are laid out sorted by name, 8-byte aligned
// header, as the reference implementation does. Not thread-safe.
class SafetensorsWriter {
 public:
  // Copies `nbytes` bytes; validates shape x dtype size == nbytes (INVALID_ARGUMENT otherwise) and
  // rejects duplicate names (ALREADY_EXISTS) and empty names (INVALID_ARGUMENT).
  absl::Status Add(const std::string& name, DType dtype, std::vector<int64_t> shape,
                   const void* bytes, size_t nbytes);
  // As Add() but without copying: `bytes` must stay valid and unchanged until Write() returns.
  // Used for large tensors (activation shards) to avoid holding two copies in memory.
  absl::Status AddBorrowed(const std::string& name, DType dtype, std::vector<int64_t> shape,
                           const void* bytes, size_t nbytes);
  void SetMetadata(const std::string& key, const std::string& value) { metadata_[key] = value; }
  // Writes the file; on any error (I/O, disk full, rename) removes the temporary file, leaves any
  // previous file at `path` untouched and returns the error naming `path`. May be called again.
  absl::Status Write(const std::string& path) const;

 private:
  struct Entry {
    DType dtype;
    std::vector<int64_t> shape;
    std::vector<uint8_t> owned;      // the bytes when copied
    const uint8_t* bytes = nullptr;  // points into `owned` or at the caller's buffer
    size_t nbytes = 0;
  };
  absl::Status AddEntry(const std::string& name, DType dtype, std::vector<int64_t> shape,
                        const void* bytes, size_t nbytes, bool copy);
  std::map<std::string, Entry> entries_;
  std::map<std::string, std::string> metadata_;
};

// Writes a safetensors file whose tensors all have the row count as their first dimension, the rows
// arriving in batches. The first column's bytes go to the file as they arrive (room for the header
// is reserved for max_rows rows and padded with spaces, which the format allows); the other
// columns, meant to be small, are kept until Finish(), which appends them after the first, writes
// the header and installs the file as SafetensorsWriter does (temporary file, fsync, rename): the
// file appears at `path` only complete; its pages then leave the page cache (such files are
// typically many, together larger than memory). Destroying an unfinished writer removes its
// temporary file. Not thread-safe.
class SafetensorsRowWriter {
 public:
  struct Column {
    std::string name;
    DType dtype = DType::kF32;
    std::vector<int64_t> row_shape;  // the shape of one row (empty: a scalar per row)
  };
  static absl::StatusOr<std::unique_ptr<SafetensorsRowWriter>> Open(
      const std::string& path, std::vector<Column> columns, int64_t max_rows,
      std::map<std::string, std::string> metadata = {});
  ~SafetensorsRowWriter();
  SafetensorsRowWriter(const SafetensorsRowWriter&) = delete;
  SafetensorsRowWriter& operator=(const SafetensorsRowWriter&) = delete;

  // data[c] holds `rows` rows of column c (row-major, in the column's dtype). More than max_rows
  // rows in all is OUT_OF_RANGE. After an I/O error the writer is unusable (FAILED_PRECONDITION).
  absl::Status Append(const std::vector<const void*>& data, int64_t rows);
  int64_t rows() const { return rows_; }
  absl::Status Finish();

 private:
  SafetensorsRowWriter() = default;
  std::string HeaderText(int64_t rows) const;
  absl::Status Fail(int err, std::string_view what);
  std::string path_, tmp_;
  std::vector<Column> columns_;
  std::vector<uint64_t> row_bytes_;
  std::map<std::string, std::string> metadata_;
  std::vector<std::vector<uint8_t>> kept_;  // columns 1.. until Finish
  int64_t max_rows_ = 0, rows_ = 0;
  uint64_t header_room_ = 0;  // bytes of header text (a multiple of 8)
  int fd_ = -1;
  bool failed_ = false, finished_ = false;
};

}  // namespace crossdiff::tensor_io
