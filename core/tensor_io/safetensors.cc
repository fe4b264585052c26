#include "core/tensor_io/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"

static_assert(__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__,
              "safetensors data is little-endian; this reader copies bytes as they are");

namespace crossdiff::tensor_io {
namespace {

using Json = nlohmann::json;

// The reference implementation refuses headers above 100 MB; so do we, before allocating.
constexpr uint64_t kMaxHeaderBytes = 100ull << 20;

struct DTypeEntry {
  DType dtype;
  const char* name;
  size_t size;
};
constexpr DTypeEntry kDTypes[] = {
    {DType::kF32, "F32", 4},   {DType::kF16, "F16", 2}, {DType::kBF16, "BF16", 2},
    {DType::kF64, "F64", 8},   {DType::kI64, "I64", 8}, {DType::kI32, "I32", 4},
    {DType::kI16, "I16", 2},   {DType::kI8, "I8", 1},   {DType::kU8, "U8", 1},
    {DType::kBool, "BOOL", 1},
};

absl::Status ErrnoError(int err, const std::string& path, std::string_view what) {
  return absl::ErrnoToStatus(err, absl::StrCat(path, ": ", std::string(what)));
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// shape x dtype size in bytes; false on a negative dimension or overflow.
bool ByteSize(const std::vector<int64_t>& shape, DType dtype, uint64_t* out) {
  uint64_t n = DTypeSize(dtype);
  for (int64_t d : shape) {
    if (d < 0) return false;
    if (__builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *out = n;
  return true;
}

// Parses one header entry into `info` (name already set). Errors are prefixed by the caller.
absl::Status ParseEntry(const Json& j, TensorInfo* info) {
  if (!j.is_object()) return absl::InvalidArgumentError("entry is not a JSON object");
  auto dt = j.find("dtype");
  if (dt == j.end() || !dt->is_string()) {
    return absl::InvalidArgumentError("field 'dtype' missing or not a string");
  }
  ASSIGN_OR_RETURN(info->dtype, ParseDType(dt->get<std::string>()));
  auto sh = j.find("shape");
  if (sh == j.end() || !sh->is_array()) {
    return absl::InvalidArgumentError("field 'shape' missing or not an array");
  }
  info->shape.clear();
  for (const Json& d : *sh) {
    if (!d.is_number_unsigned()) {
      return absl::InvalidArgumentError(
          absl::StrCat("field 'shape' holds ", d.dump(), ", not a non-negative integer"));
    }
    uint64_t v = d.get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) {
      return absl::InvalidArgumentError("field 'shape' holds a dimension beyond int64");
    }
    info->shape.push_back(static_cast<int64_t>(v));
  }
  auto off = j.find("data_offsets");
  if (off == j.end() || !off->is_array() || off->size() != 2 || !(*off)[0].is_number_unsigned() ||
      !(*off)[1].is_number_unsigned()) {
    return absl::InvalidArgumentError(
        "field 'data_offsets' missing or not two non-negative integers");
  }
  info->begin = (*off)[0].get<uint64_t>();
  info->end = (*off)[1].get<uint64_t>();
  if (info->end < info->begin) {
    return absl::InvalidArgumentError(
        absl::StrCat("data_offsets [", info->begin, ", ", info->end, "] end before begin"));
  }
  uint64_t expected = 0;
  if (!ByteSize(info->shape, info->dtype, &expected)) {
    return absl::InvalidArgumentError(
        absl::StrCat("shape ", ShapeString(info->shape), " overflows the byte size"));
  }
  if (expected != info->nbytes()) {
    return absl::InvalidArgumentError(
        absl::StrCat("dtype ", std::string(DTypeName(info->dtype)), " x shape ",
                     ShapeString(info->shape), " needs ", expected, " bytes but data_offsets [",
                     info->begin, ", ", info->end, "] span ", info->nbytes()));
  }
  return absl::OkStatus();
}

// Writes all of [data, data+n) to fd, retrying short writes and EINTR.
bool WriteAll(int fd, const void* data, size_t n, int* err) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  while (n > 0) {
    ssize_t w = ::write(fd, p, std::min<size_t>(n, 1u << 30));
    if (w < 0) {
      if (errno == EINTR) continue;
      *err = errno;
      return false;
    }
    p += w;
    n -= static_cast<size_t>(w);
  }
  return true;
}

std::string ParentDir(const std::string& path) {
  auto slash = path.rfind('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

// A header object holding only `metadata` (as "__metadata__", when there is any).
Json HeaderWithMetadata(const std::map<std::string, std::string>& metadata) {
  Json header = Json::object();
  if (!metadata.empty()) {
    Json meta = Json::object();
    for (const auto& [k, v] : metadata) meta[k] = v;
    header["__metadata__"] = meta;
  }
  return header;
}

std::string TemporaryPath(const std::string& path) {
  return absl::StrCat(path, ".tmp-", ::getpid());
}

// fsyncs and closes `fd` (the complete file at `tmp`), renames it to `path` and makes the rename
// durable; on any failure removes `tmp` and returns the error naming `path`.
absl::Status InstallTemporary(int fd, const std::string& tmp, const std::string& path,
                              bool drop_cached = false) {
  bool ok = true;
  int err = 0;
  if (::fsync(fd) != 0) {
    ok = false;
    err = errno;
  }
  // Once durable, the written pages are clean: optionally hand them back to the page cache.
  if (ok && drop_cached) ::posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED);
  if (::close(fd) != 0 && ok) {
    ok = false;
    err = errno;
  }
  if (!ok) {
    ::unlink(tmp.c_str());
    return ErrnoError(err, path, "write failed (nothing was written to this path)");
  }
  if (::rename(tmp.c_str(), path.c_str()) != 0) {
    err = errno;
    ::unlink(tmp.c_str());
    return ErrnoError(err, path, "cannot rename the temporary file into place");
  }
  int dfd = ::open(ParentDir(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

bool IsDirectory(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISDIR(st.st_mode);
}

bool IsFile(const std::string& path) {
  struct stat st;
  return ::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode);
}

}  // namespace

std::string_view DTypeName(DType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

absl::StatusOr<DType> ParseDType(std::string_view name) {
  for (const auto& e : kDTypes) {
    if (name == e.name) return e.dtype;
  }
  return absl::InvalidArgumentError(
      absl::StrCat("unknown dtype '", std::string(name),
                   "' (known: F32, F16, BF16, F64, I64, I32, I16, I8, U8, BOOL)"));
}

size_t DTypeSize(DType dtype) {
  for (const auto& e : kDTypes) {
    if (e.dtype == dtype) return e.size;
  }
  return 0;
}

int64_t TensorInfo::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

// ---------------------------------------------------------------------------------------------
// SafetensorsFile

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return ErrnoError(errno, path, "cannot open safetensors file");
  struct stat st;
  if (::fstat(fd, &st) != 0) {
    int err = errno;
    ::close(fd);
    return ErrnoError(err, path, "cannot stat");
  }
  if (!S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(path, ": not a regular file"));
  }
  const uint64_t file_size = static_cast<uint64_t>(st.st_size);
  if (file_size < 8) {
    ::close(fd);
    return absl::InvalidArgumentError(absl::StrCat(
        path, ": truncated: ", file_size, " bytes, shorter than the 8-byte header length"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->path_ = path;
  void* map = ::mmap(nullptr, file_size, PROT_READ, MAP_SHARED, fd, 0);
  int map_err = errno;
  ::close(fd);  // the mapping keeps the file alive
  if (map == MAP_FAILED) return ErrnoError(map_err, path, "cannot mmap");
  file->mapping_ = map;
  file->mapping_size_ = file_size;
  const uint8_t* base = static_cast<const uint8_t*>(map);

  uint64_t header_len = 0;
  std::memcpy(&header_len, base, 8);
  if (header_len > file_size - 8) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header length ", header_len,
                                                   " exceeds the file (", file_size,
                                                   " bytes; truncated or not safetensors?)"));
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header length ", header_len, " above the 100 MB limit"));
  }
  const char* header = reinterpret_cast<const char*>(base + 8);
  Json j = Json::parse(header, header + header_len, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(
        absl::StrCat(path, ": header is not well-formed JSON (", header_len, " bytes)"));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path, ": header is not a JSON object"));
  }
  file->data_ = base + 8 + header_len;
  file->data_size_ = file_size - 8 - header_len;

  for (auto it = j.begin(); it != j.end(); ++it) {
    if (it.key() == "__metadata__") {
      if (!it->is_object()) {
        return absl::InvalidArgumentError(
            absl::StrCat(path, ": __metadata__ is not a JSON object"));
      }
      for (auto m = it->begin(); m != it->end(); ++m) {
        if (!m->is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(path, ": __metadata__ value '", m.key(), "' is not a string"));
        }
        file->metadata_[m.key()] = m->get<std::string>();
      }
      continue;
    }
    TensorInfo info;
    info.name = it.key();
    absl::Status s = ParseEntry(*it, &info);
    if (!s.ok()) {
      return absl::Status(s.code(),
                          absl::StrCat(path, ": tensor '", info.name, "': ", s.message()));
    }
    if (info.end > file->data_size_) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensor '", info.name, "': data_offsets [", info.begin, ", ", info.end,
          "] out of range: the data section holds ", file->data_size_, " bytes"));
    }
    file->tensors_.push_back(std::move(info));
  }
  std::stable_sort(file->tensors_.begin(), file->tensors_.end(),
                   [](const TensorInfo& a, const TensorInfo& b) {
                     return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
                   });
  for (size_t i = 1; i < file->tensors_.size(); ++i) {
    const TensorInfo& prev = file->tensors_[i - 1];
    const TensorInfo& cur = file->tensors_[i];
    if (cur.begin < prev.end) {
      return absl::InvalidArgumentError(absl::StrCat(
          path, ": tensors '", prev.name, "' [", prev.begin, ", ", prev.end, ") and '", cur.name,
          "' [", cur.begin, ", ", cur.end, ") have overlapping data_offsets"));
    }
  }
  for (size_t i = 0; i < file->tensors_.size(); ++i) file->index_[file->tensors_[i].name] = i;
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_size_);
}

const TensorInfo* SafetensorsFile::Find(std::string_view name) const {
  auto it = index_.find(std::string(name));
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

absl::StatusOr<const TensorInfo*> SafetensorsFile::Get(std::string_view name) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor named '", std::string(name), "'"));
  }
  return info;
}

void SafetensorsFile::ReleasePages(uint64_t begin, uint64_t end) const {
  if (mapping_ == nullptr || end <= begin) return;
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  const uint64_t base = reinterpret_cast<uint64_t>(mapping_);
  uint64_t lo = reinterpret_cast<uint64_t>(data_) + begin;
  uint64_t hi = reinterpret_cast<uint64_t>(data_) + std::min(end, data_size_);
  lo = (lo + page - 1) / page * page;  // whole pages inside the range only
  hi = hi / page * page;
  if (lo < base || hi <= lo) return;
  // MADV_DONTNEED on a read-only shared file mapping only unmaps our pages; data faults back in.
  ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_DONTNEED);
}

void SafetensorsFile::PrefetchPages(uint64_t begin, uint64_t end) const {
  if (mapping_ == nullptr || end <= begin) return;
  static const uint64_t page = static_cast<uint64_t>(::sysconf(_SC_PAGESIZE));
  uint64_t lo = reinterpret_cast<uint64_t>(data_) + begin;
  uint64_t hi = reinterpret_cast<uint64_t>(data_) + std::min(end, data_size_);
  lo = lo / page * page;  // every page touching the range
  if (hi <= lo) return;
  ::madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_WILLNEED);
}

// ---------------------------------------------------------------------------------------------
// Checkpoint

absl::StatusOr<std::unique_ptr<Checkpoint>> Checkpoint::Open(const std::string& path) {
  std::string target = path;
  if (IsDirectory(path)) {
    std::string index = path + "/model.safetensors.index.json";
    std::string single = path + "/model.safetensors";
    if (IsFile(index)) {
      target = index;
    } else if (IsFile(single)) {
      target = single;
    } else {
      return absl::NotFoundError(
          absl::StrCat(path, ": holds neither model.safetensors nor model.safetensors.index.json"));
    }
  }
  auto ckpt = std::make_unique<Checkpoint>();
  ckpt->path_ = target;
  const std::string suffix = ".index.json";
  bool is_index = target.size() > suffix.size() &&
                  target.compare(target.size() - suffix.size(), suffix.size(), suffix) == 0;
  if (!is_index) {
    ASSIGN_OR_RETURN(auto file, SafetensorsFile::Open(target));
    for (const TensorInfo& t : file->tensors()) ckpt->where_[t.name] = 0;
    ckpt->files_.push_back(std::move(file));
    return ckpt;
  }

  std::ifstream in(target, std::ios::binary);
  if (!in) return ErrnoError(errno, target, "cannot open index file");
  std::stringstream buf;
  buf << in.rdbuf();
  Json j = Json::parse(buf.str(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(target, ": not a well-formed JSON object"));
  }
  auto wm = j.find("weight_map");
  if (wm == j.end() || !wm->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(target, ": field 'weight_map' missing or not an object"));
  }
  const std::string dir = ParentDir(target);
  std::map<std::string, size_t> file_index;
  for (auto it = wm->begin(); it != wm->end(); ++it) {
    if (!it->is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(target, ": weight_map['", it.key(), "'] is not a file name string"));
    }
    std::string shard = it->get<std::string>();
    if (shard.empty() || shard[0] == '/' || shard.find("..") != std::string::npos) {
      return absl::InvalidArgumentError(absl::StrCat(target, ": weight_map['", it.key(),
                                                     "'] names '", shard,
                                                     "', not a file inside the checkpoint"));
    }
    auto f = file_index.find(shard);
    if (f == file_index.end()) {
      auto opened = SafetensorsFile::Open(dir + "/" + shard);
      if (!opened.ok()) {
        return absl::Status(opened.status().code(),
                            absl::StrCat(target, ": shard '", shard,
                                         "' named by weight_map: ", opened.status().message()));
      }
      f = file_index.emplace(shard, ckpt->files_.size()).first;
      ckpt->files_.push_back(*std::move(opened));
    }
    if (ckpt->files_[f->second]->Find(it.key()) == nullptr) {
      return absl::InvalidArgumentError(absl::StrCat(target, ": weight_map puts tensor '", it.key(),
                                                     "' in '", shard, "', which does not hold it"));
    }
    ckpt->where_[it.key()] = f->second;
  }
  return ckpt;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(where_.size());
  for (const auto& [name, _] : where_) out.push_back(name);
  return out;
}

bool Checkpoint::Contains(std::string_view name) const { return where_.find(name) != where_.end(); }

absl::StatusOr<const TensorInfo*> Checkpoint::Get(std::string_view name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor named '", std::string(name), "'"));
  }
  return files_[it->second]->Find(name);
}

absl::StatusOr<const SafetensorsFile*> Checkpoint::FileOf(std::string_view name) const {
  auto it = where_.find(name);
  if (it == where_.end()) {
    return absl::NotFoundError(absl::StrCat(path_, ": no tensor named '", std::string(name), "'"));
  }
  return files_[it->second].get();
}

// ---------------------------------------------------------------------------------------------
// SafetensorsWriter

absl::Status SafetensorsWriter::AddEntry(const std::string& name, DType dtype,
                                         std::vector<int64_t> shape, const void* bytes,
                                         size_t nbytes, bool copy) {
  if (name.empty()) return absl::InvalidArgumentError("safetensors writer: empty tensor name");
  if (name == "__metadata__") {
    return absl::InvalidArgumentError("safetensors writer: '__metadata__' is reserved");
  }
  if (entries_.count(name) != 0) {
    return absl::AlreadyExistsError(
        absl::StrCat("safetensors writer: tensor '", name, "' added twice"));
  }
  uint64_t expected = 0;
  if (!ByteSize(shape, dtype, &expected) || expected != nbytes) {
    return absl::InvalidArgumentError(absl::StrCat(
        "safetensors writer: tensor '", name, "': dtype ", std::string(DTypeName(dtype)),
        " x shape ", ShapeString(shape), " does not match ", nbytes, " bytes"));
  }
  if (nbytes > 0 && bytes == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("safetensors writer: tensor '", name, "': null data"));
  }
  Entry& e = entries_[name];
  e.dtype = dtype;
  e.shape = std::move(shape);
  e.nbytes = nbytes;
  if (copy) {
    const uint8_t* p = static_cast<const uint8_t*>(bytes);
    e.owned.assign(p, p + nbytes);
    e.bytes = e.owned.data();
  } else {
    e.bytes = static_cast<const uint8_t*>(bytes);
  }
  return absl::OkStatus();
}

absl::Status SafetensorsWriter::Add(const std::string& name, DType dtype,
                                    std::vector<int64_t> shape, const void* bytes, size_t nbytes) {
  return AddEntry(name, dtype, std::move(shape), bytes, nbytes, /*copy=*/true);
}

absl::Status SafetensorsWriter::AddBorrowed(const std::string& name, DType dtype,
                                            std::vector<int64_t> shape, const void* bytes,
                                            size_t nbytes) {
  return AddEntry(name, dtype, std::move(shape), bytes, nbytes, /*copy=*/false);
}

absl::Status SafetensorsWriter::Write(const std::string& path) const {
  Json header = HeaderWithMetadata(metadata_);
  uint64_t offset = 0;
  for (const auto& [name, e] : entries_) {  // std::map: sorted by name, as the reference lays out
    header[name] = {{"dtype", std::string(DTypeName(e.dtype))},
                    {"shape", e.shape},
                    {"data_offsets", {offset, offset + e.nbytes}}};
    offset += e.nbytes;
  }
  std::string text = header.dump();
  // Pad with spaces so the data section starts 8-byte aligned (8 + len is a multiple of 8).
  text.append((8 - text.size() % 8) % 8, ' ');
  uint64_t len = text.size();

  const std::string tmp = TemporaryPath(path);
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return ErrnoError(errno, path, "cannot create temporary file for writing");
  int err = 0;
  bool ok = WriteAll(fd, &len, 8, &err) && WriteAll(fd, text.data(), text.size(), &err);
  for (auto it = entries_.begin(); ok && it != entries_.end(); ++it) {
    ok = WriteAll(fd, it->second.bytes, it->second.nbytes, &err);
  }
  if (!ok) {
    ::close(fd);
    ::unlink(tmp.c_str());
    return ErrnoError(err, path, "write failed (nothing was written to this path)");
  }
  return InstallTemporary(fd, tmp, path);
}

// ---------------------------------------------------------------------------------------------
// SafetensorsRowWriter

absl::StatusOr<std::unique_ptr<SafetensorsRowWriter>> SafetensorsRowWriter::Open(
    const std::string& path, std::vector<Column> columns, int64_t max_rows,
    std::map<std::string, std::string> metadata) {
  const std::string what = absl::StrCat("safetensors row writer ", path);
  if (columns.empty()) return absl::InvalidArgumentError(absl::StrCat(what, ": no columns"));
  if (max_rows < 0) {
    return absl::InvalidArgumentError(absl::StrCat(what, ": max_rows ", max_rows, " < 0"));
  }
  std::unique_ptr<SafetensorsRowWriter> w(new SafetensorsRowWriter());
  std::set<std::string> names;
  for (const Column& c : columns) {
    if (c.name.empty() || c.name == "__metadata__" || !names.insert(c.name).second) {
      return absl::InvalidArgumentError(
          absl::StrCat(what, ": column name '", c.name, "' is empty, reserved or repeated"));
    }
    uint64_t bytes = 0;
    if (!ByteSize(c.row_shape, c.dtype, &bytes)) {
      return absl::InvalidArgumentError(absl::StrCat(what, ": column '", c.name, "': row shape ",
                                                     ShapeString(c.row_shape), " is invalid"));
    }
    w->row_bytes_.push_back(bytes);
  }
  w->path_ = path;
  w->columns_ = std::move(columns);
  w->metadata_ = std::move(metadata);
  w->max_rows_ = max_rows;
  w->kept_.resize(w->columns_.size());
  // Fewer rows never make the header longer (its numbers only get shorter).
  const uint64_t longest = w->HeaderText(max_rows).size();
  w->header_room_ = (longest + 7) / 8 * 8;
  w->tmp_ = TemporaryPath(path);
  w->fd_ = ::open(w->tmp_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (w->fd_ < 0) return ErrnoError(errno, path, "cannot create temporary file for writing");
  if (::lseek(w->fd_, static_cast<off_t>(8 + w->header_room_), SEEK_SET) < 0) {
    const int err = errno;
    return w->Fail(err, "cannot seek past the header");
  }
  return w;
}

SafetensorsRowWriter::~SafetensorsRowWriter() {
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
  }
}

std::string SafetensorsRowWriter::HeaderText(int64_t rows) const {
  Json header = HeaderWithMetadata(metadata_);
  uint64_t offset = 0;
  for (size_t c = 0; c < columns_.size(); ++c) {  // the first column first, then the kept ones
    std::vector<int64_t> shape = {rows};
    shape.insert(shape.end(), columns_[c].row_shape.begin(), columns_[c].row_shape.end());
    const uint64_t n = row_bytes_[c] * static_cast<uint64_t>(rows);
    header[columns_[c].name] = {{"dtype", std::string(DTypeName(columns_[c].dtype))},
                                {"shape", shape},
                                {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  return header.dump();
}

absl::Status SafetensorsRowWriter::Fail(int err, std::string_view what) {
  failed_ = true;
  if (fd_ >= 0) {
    ::close(fd_);
    ::unlink(tmp_.c_str());
    fd_ = -1;
  }
  return ErrnoError(err, path_, std::string(what) + " (nothing was written to this path)");
}

absl::Status SafetensorsRowWriter::Append(const std::vector<const void*>& data, int64_t rows) {
  if (failed_ || finished_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "safetensors row writer ", path_, failed_ ? ": an earlier write failed" : ": finished"));
  }
  if (data.size() != columns_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("safetensors row writer ", path_, ": ",
                                                   data.size(), " columns given, expected ",
                                                   columns_.size()));
  }
  if (rows < 0 || rows > max_rows_ - rows_) {
    return absl::OutOfRangeError(absl::StrCat("safetensors row writer ", path_, ": ", rows_, " + ",
                                              rows, " rows exceed max_rows ", max_rows_));
  }
  if (rows == 0) return absl::OkStatus();
  const uint64_t first = row_bytes_[0] * static_cast<uint64_t>(rows);
  int err = 0;
  if (!WriteAll(fd_, data[0], first, &err)) return Fail(err, "write failed");
#if defined(__linux__)
  // Start writing these pages back now, so that Finish's fsync waits only for the last ones.
  const uint64_t at = 8 + header_room_ + row_bytes_[0] * static_cast<uint64_t>(rows_);
  ::sync_file_range(fd_, static_cast<off64_t>(at), static_cast<off64_t>(first),
                    SYNC_FILE_RANGE_WRITE);
#endif
  for (size_t c = 1; c < columns_.size(); ++c) {
    const auto* p = static_cast<const uint8_t*>(data[c]);
    kept_[c].insert(kept_[c].end(), p, p + row_bytes_[c] * static_cast<uint64_t>(rows));
  }
  rows_ += rows;
  return absl::OkStatus();
}

absl::Status SafetensorsRowWriter::Finish() {
  if (failed_ || finished_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "safetensors row writer ", path_, failed_ ? ": an earlier write failed" : ": finished"));
  }
  int err = 0;
  for (size_t c = 1; c < columns_.size(); ++c) {
    if (!WriteAll(fd_, kept_[c].data(), kept_[c].size(), &err)) return Fail(err, "write failed");
    std::vector<uint8_t>().swap(kept_[c]);
  }
  std::string text = HeaderText(rows_);
  text.append(header_room_ - text.size(), ' ');
  const uint64_t len = text.size();
  std::string head(reinterpret_cast<const char*>(&len), 8);
  head += text;
  errno = 0;
  if (::pwrite(fd_, head.data(), head.size(), 0) != static_cast<ssize_t>(head.size())) {
    return Fail(errno != 0 ? errno : EIO, "header write failed");
  }
  const int fd = fd_;
  fd_ = -1;
  finished_ = true;
  // A row-streamed file is typically one of many (an activation store far larger than memory):
  // its pages leave the page cache once written rather than pushing out everything else.
  absl::Status s = InstallTemporary(fd, tmp_, path_, /*drop_cached=*/true);
  if (!s.ok()) failed_ = true;
  return s;
}

}  // namespace crossdiff::tensor_io
