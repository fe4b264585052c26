// The module edge between LibTorch (which throws c10::Error) and our absl::Status vocabulary.
#pragma once

#include <exception>
#include <string>
#include <utility>

#include <c10/util/Exception.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace crossdiff {

// Runs `fn` (returning absl::Status or absl::StatusOr<T>) and converts any exception it throws into
// an INTERNAL status prefixed with `context`. c10::Error messages keep their first line only.
template <typename Fn>
auto GuardTorch(const std::string& context, Fn&& fn) -> decltype(fn()) {
  try {
    return fn();
  } catch (const c10::Error& e) {
    std::string msg = e.what_without_backtrace();
    if (auto nl = msg.find('\n'); nl != std::string::npos) msg.resize(nl);
    return absl::InternalError(absl::StrCat(context, ": ", msg));
  } catch (const std::exception& e) {
    return absl::InternalError(absl::StrCat(context, ": ", e.what()));
  }
}

}  // namespace crossdiff
