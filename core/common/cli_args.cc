#include "core/common/cli_args.h"

#include <cstdlib>
#include <iostream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"

namespace crossdiff {

CommandLine::CommandLine(std::string command, std::string summary)
    : command_(std::move(command)), summary_(std::move(summary)) {}

CommandLine::Flag& CommandLine::Add(const std::string& name, Kind kind, std::string help,
                                    bool required) {
  order_.push_back(name);
  Flag& f = flags_[name];
  f.kind = kind;
  f.help = std::move(help);
  f.required = required;
  return f;
}

std::string& CommandLine::AddString(const std::string& name, std::string def, std::string help,
                                    bool required) {
  Flag& f = Add(name, Kind::kString, std::move(help), required);
  f.default_text = def;
  strings_.push_back(std::move(def));
  f.s = &strings_.back();
  return *f.s;
}

int64_t& CommandLine::AddInt(const std::string& name, int64_t def, std::string help,
                             bool required) {
  Flag& f = Add(name, Kind::kInt, std::move(help), required);
  f.default_text = std::to_string(def);
  ints_.push_back(def);
  f.i = &ints_.back();
  return *f.i;
}

double& CommandLine::AddDouble(const std::string& name, double def, std::string help,
                               bool required) {
  Flag& f = Add(name, Kind::kDouble, std::move(help), required);
  std::ostringstream os;
  os << def;
  f.default_text = os.str();
  doubles_.push_back(def);
  f.d = &doubles_.back();
  return *f.d;
}

bool& CommandLine::AddBool(const std::string& name, std::string help) {
  Flag& f = Add(name, Kind::kBool, std::move(help), false);
  bools_.push_back(false);
  f.b = &bools_.back();
  return *f.b;
}

void CommandLine::SetPositionalHelp(std::string usage, size_t min_count, size_t max_count) {
  positional_usage_ = std::move(usage);
  min_positional_ = min_count;
  max_positional_ = max_count;
}

bool CommandLine::Given(const std::string& name) const {
  auto it = flags_.find(name);
  return it != flags_.end() && it->second.given;
}

absl::Status CommandLine::Parse(int argc, char** argv) {
  positional_.clear();
  bool only_positional = false;
  for (int a = 1; a < argc; ++a) {
    std::string arg = argv[a];
    if (only_positional || arg.size() < 2 || arg[0] != '-' || arg == "-") {
      positional_.push_back(arg);
      continue;
    }
    if (arg == "--") {
      only_positional = true;
      continue;
    }
    if (arg == "--help" || arg == "-h") {
      help_requested_ = true;
      return absl::OkStatus();
    }
    if (arg.rfind("--", 0) != 0) {
      return absl::InvalidArgumentError(absl::StrCat(command_, ": unknown option '", arg, "'"));
    }
    std::string name = arg.substr(2), value;
    bool has_value = false;
    if (auto eq = name.find('='); eq != std::string::npos) {
      value = name.substr(eq + 1);
      name.resize(eq);
      has_value = true;
    }
    auto it = flags_.find(name);
    if (it == flags_.end()) {
      return absl::InvalidArgumentError(
          absl::StrCat(command_, ": unknown flag --", name, " (see --help)"));
    }
    Flag& f = it->second;
    f.given = true;
    if (f.kind == Kind::kBool) {
      if (!has_value) {
        *f.b = true;
      } else if (value == "true" || value == "1") {
        *f.b = true;
      } else if (value == "false" || value == "0") {
        *f.b = false;
      } else {
        return absl::InvalidArgumentError(
            absl::StrCat("--", name, ": expected true or false, got '", value, "'"));
      }
      continue;
    }
    if (!has_value) {
      if (a + 1 >= argc) {
        return absl::InvalidArgumentError(absl::StrCat("--", name, ": missing value"));
      }
      value = argv[++a];
    }
    switch (f.kind) {
      case Kind::kString:
        *f.s = value;
        break;
      case Kind::kInt:
        if (!absl::SimpleAtoi(value, f.i)) {
          return absl::InvalidArgumentError(
              absl::StrCat("--", name, ": expected an integer, got '", value, "'"));
        }
        break;
      case Kind::kDouble:
        if (!absl::SimpleAtod(value, f.d)) {
          return absl::InvalidArgumentError(
              absl::StrCat("--", name, ": expected a number, got '", value, "'"));
        }
        break;
      case Kind::kBool:
        break;
    }
  }
  for (const auto& name : order_) {
    const Flag& f = flags_.at(name);
    if (f.required && !f.given) {
      return absl::InvalidArgumentError(absl::StrCat(command_, ": --", name, " is required"));
    }
  }
  if (positional_.size() < min_positional_ ||
      (max_positional_ > 0 && positional_.size() > max_positional_) ||
      (max_positional_ == 0 && min_positional_ == 0 && !positional_.empty() &&
       positional_usage_.empty())) {
    if (positional_usage_.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat(command_, ": unexpected argument '", positional_.front(), "'"));
    }
    return absl::InvalidArgumentError(
        absl::StrCat(command_, ": expected ", positional_usage_));
  }
  return absl::OkStatus();
}

int CommandLine::ParseOrExit(int argc, char** argv) {
  absl::Status s = Parse(argc, argv);
  if (help_requested_) {
    std::cout << Usage();
    return 0;
  }
  if (!s.ok()) {
    std::cerr << "error: " << s.message() << "\n";
    return 2;
  }
  return -1;
}

std::string CommandLine::Usage() const {
  std::ostringstream os;
  os << "usage: " << command_;
  if (!positional_usage_.empty()) os << " " << positional_usage_;
  os << " [flags]\n\n" << summary_ << "\n\nflags:\n";
  for (const auto& name : order_) {
    const Flag& f = flags_.at(name);
    os << "  --" << name;
    if (f.kind != Kind::kBool) os << " VALUE";
    os << "\n      " << f.help;
    if (f.required) {
      os << " (required)";
    } else if (f.kind != Kind::kBool && !f.default_text.empty()) {
      os << " (default: " << f.default_text << ")";
    }
    os << "\n";
  }
  os << "  --help\n      print this help\n";
  return os.str();
}

}  // namespace crossdiff
