// A small command-line parser shared by every crossdiff binary and subcommand.
//
//   CommandLine cl("crossdiff harvest", "writes an activation store ...");
//   auto& base = cl.AddString("base", "", "base model directory", /*required=*/true);
//   auto& layer = cl.AddInt("layer", -1, "block whose output is harvested", true);
//   auto& add_special = cl.AddBool("add-special", "prepend BOS/EOS");
//   if (int rc = cl.ParseOrExit(argc, argv); rc >= 0) return rc;   // --help or bad flags
//
// Flags take `--name value` or `--name=value`; booleans take `--name` (or `--name=false`).
// Everything that is not a flag is a positional argument (`cl.positional()`).
// Not thread-safe; one parser per command invocation.
#pragma once

#include <cstdint>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace crossdiff {

class CommandLine {
 public:
  CommandLine(std::string command, std::string summary);

  std::string& AddString(const std::string& name, std::string def, std::string help,
                         bool required = false);
  int64_t& AddInt(const std::string& name, int64_t def, std::string help, bool required = false);
  double& AddDouble(const std::string& name, double def, std::string help, bool required = false);
  bool& AddBool(const std::string& name, std::string help);
  // Describes the positional arguments in --help (e.g. "JOB.yaml").
  void SetPositionalHelp(std::string usage, size_t min_count, size_t max_count);

  // Parses argv[1..]. Returns INVALID_ARGUMENT naming the flag on unknown flags, missing values,
  // malformed numbers or missing required flags. `help_requested()` is true after --help / -h.
  absl::Status Parse(int argc, char** argv);
  bool help_requested() const { return help_requested_; }
  // True when the flag was given explicitly on the command line.
  bool Given(const std::string& name) const;

  // Parse + the conventional handling: prints --help to stdout and returns 0, prints one error line
  // to stderr and returns 2; returns -1 when the command should run.
  int ParseOrExit(int argc, char** argv);

  std::string Usage() const;
  const std::vector<std::string>& positional() const { return positional_; }

 private:
  enum class Kind { kString, kInt, kDouble, kBool };
  struct Flag {
    Kind kind;
    std::string help;
    bool required = false;
    bool given = false;
    std::string default_text;
    std::string* s = nullptr;
    int64_t* i = nullptr;
    double* d = nullptr;
    bool* b = nullptr;
  };
  Flag& Add(const std::string& name, Kind kind, std::string help, bool required);

  std::string command_, summary_;
  std::string positional_usage_;
  size_t min_positional_ = 0, max_positional_ = 0;
  std::map<std::string, Flag> flags_;
  std::vector<std::string> order_;
  // Stable storage for flag values (deque never moves its elements).
  std::deque<std::string> strings_;
  std::deque<int64_t> ints_;
  std::deque<double> doubles_;
  std::deque<bool> bools_;
  std::vector<std::string> positional_;
  bool help_requested_ = false;
};

}  // namespace crossdiff
