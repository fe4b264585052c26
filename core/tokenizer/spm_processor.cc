#include "core/tokenizer/spm_processor.h"

#include <dlfcn.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <mutex>

#include "core/tokenizer/spm_plugin.h"

#ifndef CROSSDIFF_SPM_PLUGIN_PATH
#define CROSSDIFF_SPM_PLUGIN_PATH ""
#endif

namespace crossdiff::tokenizer {
namespace {

// The plugin's entry points, resolved once per process.
struct Plugin {
  decltype(&cdspm_new) create = nullptr;
  decltype(&cdspm_delete) destroy = nullptr;
  decltype(&cdspm_load) load = nullptr;
  decltype(&cdspm_encode) encode = nullptr;
  decltype(&cdspm_decode) decode = nullptr;
  decltype(&cdspm_piece_size) piece_size = nullptr;
  decltype(&cdspm_piece_to_id) piece_to_id = nullptr;
  decltype(&cdspm_id_to_piece) id_to_piece = nullptr;
  decltype(&cdspm_is_control) is_control = nullptr;
  decltype(&cdspm_special_id) special_id = nullptr;
  decltype(&cdspm_serialized) serialized = nullptr;
  decltype(&cdspm_free_buffer) free_buffer = nullptr;
  std::string error;  // why it is unavailable
  bool ok() const { return error.empty(); }
};

std::string ExecutableDir() {
  char buf[PATH_MAX];
  ssize_t n = readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return ".";
  std::string path(buf, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/'));
}

const Plugin& GetPlugin() {
  static Plugin plugin;
  static std::once_flag once;
  std::call_once(once, [] {
    std::vector<std::string> candidates;
    if (const char* env = std::getenv("CROSSDIFF_SPM_PLUGIN"); env != nullptr && *env) {
      candidates.push_back(env);
    }
    const std::string exe = ExecutableDir();
    candidates.push_back(exe + "/libcrossdiff_spm.so");
    candidates.push_back(exe + "/../lib/libcrossdiff_spm.so");
    if (*CROSSDIFF_SPM_PLUGIN_PATH) candidates.push_back(CROSSDIFF_SPM_PLUGIN_PATH);
    candidates.push_back("libcrossdiff_spm.so");
    void* handle = nullptr;
    std::string errors;
    for (const auto& c : candidates) {
      if (c.find('/') != std::string::npos && access(c.c_str(), R_OK) != 0) continue;
      // RTLD_DEEPBIND: the plugin's SentencePiece resolves protobuf to its own bundled copy;
      // RTLD_LOCAL: that copy never becomes visible to the rest of the process.
      handle = dlopen(c.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
      if (handle != nullptr) break;
      errors += std::string(" ") + dlerror();
    }
    if (handle == nullptr) {
      plugin.error = "SentencePiece support (libcrossdiff_spm.so) could not be loaded:" +
                     (errors.empty() ? std::string(" not found") : errors);
      return;
    }
    auto resolve = [&](auto& fn, const char* name) {
      fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(dlsym(handle, name));
      if (fn == nullptr && plugin.error.empty()) {
        plugin.error = std::string("libcrossdiff_spm.so lacks ") + name;
      }
    };
    resolve(plugin.create, "cdspm_new");
    resolve(plugin.destroy, "cdspm_delete");
    resolve(plugin.load, "cdspm_load");
    resolve(plugin.encode, "cdspm_encode");
    resolve(plugin.decode, "cdspm_decode");
    resolve(plugin.piece_size, "cdspm_piece_size");
    resolve(plugin.piece_to_id, "cdspm_piece_to_id");
    resolve(plugin.id_to_piece, "cdspm_id_to_piece");
    resolve(plugin.is_control, "cdspm_is_control");
    resolve(plugin.special_id, "cdspm_special_id");
    resolve(plugin.serialized, "cdspm_serialized");
    resolve(plugin.free_buffer, "cdspm_free_buffer");
  });
  return plugin;
}

// Takes ownership of a plugin-allocated error string.
std::string TakeError(const Plugin& p, char* error) {
  std::string out = error != nullptr ? error : "unknown error";
  if (error != nullptr) p.free_buffer(error);
  return out;
}

}  // namespace

SpmProcessor::SpmProcessor() = default;

SpmProcessor::~SpmProcessor() {
  if (sp_ != nullptr) GetPlugin().destroy(sp_);
}

bool SpmProcessor::LoadFromSerialized(const std::string& serialized, std::string* error) {
  const Plugin& p = GetPlugin();
  if (!p.ok()) {
    *error = p.error;
    return false;
  }
  if (sp_ == nullptr) sp_ = p.create();
  char* err = nullptr;
  if (p.load(sp_, serialized.data(), serialized.size(), &err) != 1) {
    *error = TakeError(p, err);
    return false;
  }
  pieces_.clear();
  const int n = p.piece_size(sp_);
  pieces_.reserve(static_cast<size_t>(n));
  for (int id = 0; id < n; ++id) {
    size_t size = 0;
    const char* piece = p.id_to_piece(sp_, id, &size);
    pieces_.emplace_back(piece, size);
  }
  return true;
}

bool SpmProcessor::Encode(std::string_view text, std::vector<int>* ids, std::string* error) const {
  const Plugin& p = GetPlugin();
  int* out = nullptr;
  size_t count = 0;
  char* err = nullptr;
  if (p.encode(sp_, text.data(), text.size(), &out, &count, &err) != 1) {
    *error = TakeError(p, err);
    return false;
  }
  ids->assign(out, out + count);
  p.free_buffer(out);
  return true;
}

bool SpmProcessor::Decode(const std::vector<int>& ids, std::string* text) const {
  const Plugin& p = GetPlugin();
  char* out = nullptr;
  size_t size = 0;
  if (p.decode(sp_, ids.data(), ids.size(), &out, &size) != 1) return false;
  text->assign(out, size);
  p.free_buffer(out);
  return true;
}

int SpmProcessor::piece_size() const { return static_cast<int>(pieces_.size()); }
int SpmProcessor::PieceToId(std::string_view piece) const {
  return GetPlugin().piece_to_id(sp_, piece.data(), piece.size());
}
const std::string& SpmProcessor::IdToPiece(int id) const {
  static const std::string kEmpty;
  return id >= 0 && static_cast<size_t>(id) < pieces_.size() ? pieces_[static_cast<size_t>(id)]
                                                             : kEmpty;
}
bool SpmProcessor::IsControl(int id) const { return GetPlugin().is_control(sp_, id) == 1; }
int SpmProcessor::bos_id() const { return GetPlugin().special_id(sp_, 0); }
int SpmProcessor::eos_id() const { return GetPlugin().special_id(sp_, 1); }
int SpmProcessor::pad_id() const { return GetPlugin().special_id(sp_, 2); }
int SpmProcessor::unk_id() const { return GetPlugin().special_id(sp_, 3); }

std::string SpmProcessor::SerializedModel() const {
  const Plugin& p = GetPlugin();
  size_t size = 0;
  char* out = p.serialized(sp_, &size);
  std::string s(out, size);
  p.free_buffer(out);
  return s;
}

}  // namespace crossdiff::tokenizer
