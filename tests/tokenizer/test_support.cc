#include "tests/tokenizer/test_support.h"

#include <stdlib.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <stdexcept>
#include <vector>

namespace crossdiff::tokenizer::testing {

std::string BpeFixtureDir() {
  const char* env = std::getenv("CROSSDIFF_FIXTURES");
  const std::string root =
      env != nullptr ? env : std::string(CROSSDIFF_SOURCE_DIR) + "/../shared/fixtures";
  return root + "/tokenizers/bpe-gpt2";
}

TempDir::TempDir() {
  std::string pattern = (std::filesystem::temp_directory_path() / "crossdiff-tok-XXXXXX").string();
  std::vector<char> buf(pattern.begin(), pattern.end());
  buf.push_back('\0');
  if (mkdtemp(buf.data()) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = buf.data();
}

TempDir::~TempDir() {
  std::error_code ec;
  std::filesystem::remove_all(path_, ec);
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  if (!out) throw std::runtime_error("cannot write " + path);
}

std::string ReadText(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

}  // namespace crossdiff::tokenizer::testing
