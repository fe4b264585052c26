#include "core/activations/manifest.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <fstream>
#include <nlohmann/json.hpp>
#include <set>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "core/common/status_macros.h"

namespace crossdiff::activations {
namespace {

using Json = nlohmann::json;

absl::Status Bad(const std::string& source, const std::string& field, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(source, ": field '", field, "' ", what));
}

absl::StatusOr<int64_t> GetInt(const Json& j, const std::string& source, const std::string& field) {
  auto it = j.find(field);
  if (it == j.end()) return Bad(source, field, "is missing");
  if (!it->is_number_integer()) return Bad(source, field, "is not an integer");
  return it->get<int64_t>();
}

absl::StatusOr<std::string> GetString(const Json& j, const std::string& source,
                                      const std::string& field) {
  auto it = j.find(field);
  if (it == j.end()) return Bad(source, field, "is missing");
  if (!it->is_string()) return Bad(source, field, "is not a string");
  return it->get<std::string>();
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& text) {
  const std::string tmp = absl::StrCat(path, ".tmp-", ::getpid());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot create"));
  const char* p = text.data();
  size_t left = text.size();
  int err = 0;
  while (left > 0) {
    ssize_t w = ::write(fd, p, left);
    if (w < 0) {
      if (errno == EINTR) continue;
      err = errno;
      break;
    }
    p += w;
    left -= static_cast<size_t>(w);
  }
  if (err == 0 && ::fsync(fd) != 0) err = errno;
  if (::close(fd) != 0 && err == 0) err = errno;
  if (err == 0 && ::rename(tmp.c_str(), path.c_str()) != 0) err = errno;
  if (err != 0) {
    ::unlink(tmp.c_str());
    return absl::ErrnoToStatus(err, absl::StrCat(path, ": write failed"));
  }
  auto slash = path.rfind('/');
  std::string dir = slash == std::string::npos ? "." : path.substr(0, slash == 0 ? 1 : slash);
  int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status Manifest::Validate(const std::string& source) const {
  if (models.empty()) return Bad(source, "models", "is empty");
  for (const std::string& m : models) {
    if (m.empty()) return Bad(source, "models", "holds an empty name");
  }
  if (layer < 0) return Bad(source, "layer", absl::StrCat("is ", layer, ", must be >= 0"));
  if (site.empty()) return Bad(source, "site", "is empty");
  if (d_model <= 0) return Bad(source, "d_model", absl::StrCat("is ", d_model, ", must be > 0"));
  if (dtype != "float32" && dtype != "bfloat16") {
    return Bad(source, "dtype", absl::StrCat("is '", dtype, "', must be float32 or bfloat16"));
  }
  if (rows < 0) return Bad(source, "rows", absl::StrCat("is ", rows, ", must be >= 0"));
  int64_t sum = 0;
  std::set<std::string> seen;
  for (size_t i = 0; i < shards.size(); ++i) {
    const ShardInfo& s = shards[i];
    const std::string field = absl::StrCat("shards[", i, "]");
    if (s.file.empty() || s.file.find('/') != std::string::npos || s.file == "." ||
        s.file == ".." || s.file == "manifest.json") {
      return Bad(source, field + ".file",
                 absl::StrCat("is '", s.file, "', not a file name inside the store"));
    }
    if (!seen.insert(s.file).second) {
      return Bad(source, field + ".file", absl::StrCat("repeats '", s.file, "'"));
    }
    if (s.rows <= 0) {
      return Bad(source, field + ".rows", absl::StrCat("is ", s.rows, ", must be > 0"));
    }
    sum += s.rows;
  }
  if (sum != rows) {
    return Bad(source, "rows",
               absl::StrCat("is ", rows, " but the shards hold ", sum, " rows in total"));
  }
  if (Json::parse(extra_json, nullptr, false).is_discarded() ||
      !Json::parse(extra_json, nullptr, false).is_object()) {
    return Bad(source, "extra", "is not a JSON object");
  }
  return absl::OkStatus();
}

absl::StatusOr<Manifest> Manifest::FromJson(const std::string& text, const std::string& source) {
  Json j = Json::parse(text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not well-formed JSON"));
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(source, ": not a JSON object"));
  }
  ASSIGN_OR_RETURN(std::string format, GetString(j, source, "format"));
  if (format != kManifestFormat) {
    return Bad(source, "format",
               absl::StrCat("is '", format, "', expected '", kManifestFormat, "'"));
  }
  ASSIGN_OR_RETURN(int64_t version, GetInt(j, source, "version"));
  if (version != kManifestVersion) {
    return Bad(source, "version",
               absl::StrCat("is ", version, "; this build reads version ", kManifestVersion));
  }
  Manifest m;
  auto models = j.find("models");
  if (models == j.end() || !models->is_array()) return Bad(source, "models", "is not an array");
  for (const Json& name : *models) {
    if (!name.is_string()) return Bad(source, "models", "holds a non-string");
    m.models.push_back(name.get<std::string>());
  }
  ASSIGN_OR_RETURN(int64_t layer, GetInt(j, source, "layer"));
  m.layer = static_cast<int>(layer);
  ASSIGN_OR_RETURN(m.site, GetString(j, source, "site"));
  ASSIGN_OR_RETURN(m.d_model, GetInt(j, source, "d_model"));
  ASSIGN_OR_RETURN(m.dtype, GetString(j, source, "dtype"));
  ASSIGN_OR_RETURN(m.rows, GetInt(j, source, "rows"));
  auto shards = j.find("shards");
  if (shards == j.end() || !shards->is_array()) return Bad(source, "shards", "is not an array");
  for (size_t i = 0; i < shards->size(); ++i) {
    const Json& s = (*shards)[i];
    const std::string field = absl::StrCat("shards[", i, "]");
    if (!s.is_object()) return Bad(source, field, "is not an object");
    ShardInfo info;
    auto file = s.find("file");
    if (file == s.end() || !file->is_string()) return Bad(source, field + ".file", "is missing");
    info.file = file->get<std::string>();
    auto rows = s.find("rows");
    if (rows == s.end() || !rows->is_number_integer()) {
      return Bad(source, field + ".rows", "is missing or not an integer");
    }
    info.rows = rows->get<int64_t>();
    m.shards.push_back(std::move(info));
  }
  if (auto extra = j.find("extra"); extra != j.end()) m.extra_json = extra->dump();
  RETURN_IF_ERROR(m.Validate(source));
  return m;
}

absl::StatusOr<Manifest> Manifest::LoadFile(const std::string& path) {
  struct stat st;
  if (::stat(path.c_str(), &st) != 0 && errno == ENOENT) {
    return absl::NotFoundError(absl::StrCat(
        path,
        ": not found: the store is incomplete (an interrupted harvest writes its manifest "
        "last) or not an activation store"));
  }
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::ErrnoToStatus(errno, absl::StrCat(path, ": cannot open"));
  std::stringstream buf;
  buf << in.rdbuf();
  return FromJson(buf.str(), path);
}

absl::StatusOr<Manifest> Manifest::Load(const std::string& dir) {
  return LoadFile(dir + "/manifest.json");
}

std::string Manifest::ToJson() const {
  Json j = Json::object();
  j["format"] = kManifestFormat;
  j["version"] = kManifestVersion;
  j["models"] = models;
  j["layer"] = layer;
  j["site"] = site;
  j["d_model"] = d_model;
  j["dtype"] = dtype;
  j["rows"] = rows;
  Json shard_list = Json::array();
  for (const ShardInfo& s : shards) shard_list.push_back({{"file", s.file}, {"rows", s.rows}});
  j["shards"] = shard_list;
  Json extra = Json::parse(extra_json, nullptr, false);
  if (!extra.is_discarded() && extra.is_object() && !extra.empty()) j["extra"] = extra;
  return j.dump(1) + "\n";
}

absl::Status Manifest::SaveFile(const std::string& path) const {
  RETURN_IF_ERROR(Validate(path));
  return WriteFileAtomically(path, ToJson());
}

absl::Status Manifest::Save(const std::string& dir) const {
  return SaveFile(dir + "/manifest.json");
}

absl::StatusOr<Manifest> MergeManifests(const std::vector<Manifest>& parts) {
  if (parts.empty()) return absl::InvalidArgumentError("merge manifests: no parts");
  Manifest out = parts[0];
  out.shards.clear();
  out.rows = 0;
  std::set<std::string> seen;
  for (size_t i = 0; i < parts.size(); ++i) {
    const Manifest& p = parts[i];
    const std::string name = absl::StrCat("merge manifests: part ", i);
    if (p.models != out.models) {
      return absl::InvalidArgumentError(
          absl::StrCat(name, ": models [", absl::StrJoin(p.models, ", "), "] differ from [",
                       absl::StrJoin(out.models, ", "), "]"));
    }
    if (p.layer != out.layer || p.site != out.site || p.d_model != out.d_model ||
        p.dtype != out.dtype) {
      return absl::InvalidArgumentError(absl::StrCat(
          name, ": layer/site/d_model/dtype ", p.layer, "/", p.site, "/", p.d_model, "/", p.dtype,
          " differ from ", out.layer, "/", out.site, "/", out.d_model, "/", out.dtype));
    }
    for (const ShardInfo& s : p.shards) {
      if (!seen.insert(s.file).second) {
        return absl::InvalidArgumentError(
            absl::StrCat(name, ": shard file '", s.file, "' already in another part"));
      }
      out.shards.push_back(s);
      out.rows += s.rows;
    }
  }
  RETURN_IF_ERROR(out.Validate("merged manifest"));
  return out;
}

}  // namespace crossdiff::activations
