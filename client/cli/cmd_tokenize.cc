// `crossdiff tokenize --model DIR --text STRING [--add-special]` (DESIGN.md 3.1): prints the token
// ids of STRING, space-separated on one line. `--decode "1 2 3"` prints the text of ids instead.
// Exit codes: 0 success; 2 bad flags; 1 tokenizer or input errors (one line on stderr).
#include <cstdio>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "client/cli/commands.h"
#include "core/common/cli_args.h"
#include "core/tokenizer/tokenizer.h"

namespace crossdiff::cli {

int RunTokenize(int argc, char** argv) {
  CommandLine cl(
      "crossdiff tokenize",
      "prints the token ids of a string (space-separated) using a model directory's tokenizer "
      "(tokenizer.json or tokenizer.model), or the text of ids with --decode");
  auto& model =
      cl.AddString("model", "", "model directory holding tokenizer.json or tokenizer.model", true);
  auto& text = cl.AddString("text", "", "the text to tokenize (UTF-8)");
  auto& add_special = cl.AddBool("add-special", "add BOS/EOS as the model's tokenizer config says");
  auto& decode =
      cl.AddString("decode", "", "space-separated token ids to decode instead of --text");
  if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;
  if (cl.Given("text") == cl.Given("decode")) {
    std::fprintf(stderr, "error: crossdiff tokenize: give exactly one of --text and --decode\n");
    return 2;
  }
  auto tokenizer = tokenizer::Tokenizer::Load(model);
  if (!tokenizer.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(tokenizer.status().message()).c_str());
    return 1;
  }
  if (cl.Given("decode")) {
    std::vector<int32_t> ids;
    for (absl::string_view field :
         absl::StrSplit(decode, absl::ByAnyChar(" \t,"), absl::SkipEmpty())) {
      int32_t id;
      if (!absl::SimpleAtoi(field, &id) || id < 0 || id >= (*tokenizer)->vocab_size()) {
        std::fprintf(stderr, "error: --decode: '%s' is not a token id in [0, %lld)\n",
                     std::string(field).c_str(),
                     static_cast<long long>((*tokenizer)->vocab_size()));
        return 1;
      }
      ids.push_back(id);
    }
    const std::string out = (*tokenizer)->Decode(ids);
    std::fwrite(out.data(), 1, out.size(), stdout);
    std::fputc('\n', stdout);
    return 0;
  }
  auto ids = (*tokenizer)->Encode(text, add_special);
  if (!ids.ok()) {
    std::fprintf(stderr, "error: --text: %s\n", std::string(ids.status().message()).c_str());
    return 1;
  }
  std::printf("%s\n", absl::StrJoin(*ids, " ").c_str());
  return 0;
}

}  // namespace crossdiff::cli
