#include "client/lib/event_printer.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"

namespace crossdiff::client {
namespace {

std::string Duration(double seconds) {
  if (seconds < 0 || !std::isfinite(seconds)) return "?";
  int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

}  // namespace

EventPrinter::EventPrinter(FILE* out) : out_(out), tty_(isatty(fileno(out)) != 0) {}

std::string EventPrinter::StateName(v1::JobState state) {
  std::string name = v1::JobState_Name(state);
  if (absl::StartsWith(name, "JOB_STATE_")) name = name.substr(10);
  return name;
}

std::string EventPrinter::FormatProgress(const v1::JobProgress& p) {
  std::string line = absl::StrCat(p.phase(), " ", p.done());
  if (p.total() > 0) {
    absl::StrAppendFormat(&line, "/%d %s (%.0f%%)", p.total(), p.unit(),
                          100.0 * p.done() / p.total());
  } else {
    absl::StrAppend(&line, " ", p.unit());
  }
  if (p.rate() > 0) absl::StrAppendFormat(&line, " %.1f %s/s", p.rate(), p.unit());
  if (p.eta_seconds() >= 0 && p.total() > 0 && p.done() < p.total()) {
    absl::StrAppend(&line, " ETA ", Duration(p.eta_seconds()));
  }
  if (p.has_metrics()) {
    const auto& m = p.metrics();
    absl::StrAppendFormat(&line, " loss %.4g", m.loss());
    if (m.fvu_size() > 0)
      absl::StrAppend(&line, " fvu ", absl::StrJoin(m.fvu(), "/", [](std::string* o, double v) {
        absl::StrAppendFormat(o, "%.3f", v);
      }));
    if (m.l0() > 0) absl::StrAppendFormat(&line, " l0 %.1f", m.l0());
    if (m.tokens_per_second() > 0)
      absl::StrAppendFormat(&line, " %.0f tok/s", m.tokens_per_second());
  }
  if (!p.detail().empty()) absl::StrAppend(&line, " ", p.detail());
  return line;
}

void EventPrinter::Print(const v1::JobEvent& event) {
  if (event.has_progress()) {
    std::string line = FormatProgress(event.progress());
    if (tty_) {
      const auto& p = event.progress();
      std::string bar;
      if (p.total() > 0) {
        int filled = static_cast<int>(std::clamp(20.0 * p.done() / p.total(), 0.0, 20.0));
        bar = absl::StrCat("[", std::string(filled, '#'), std::string(20 - filled, '.'), "] ");
      }
      std::fprintf(out_, "\r\033[K%s%s", bar.c_str(), line.c_str());
      line_open_ = true;
    } else {
      std::fprintf(out_, "#%lld %s\n", static_cast<long long>(event.sequence()), line.c_str());
    }
    std::fflush(out_);
    return;
  }
  Flush();
  if (event.has_phase_change()) {
    const auto& change = event.phase_change();
    std::fprintf(out_, "#%lld state %s", static_cast<long long>(event.sequence()),
                 StateName(change.to()).c_str());
    if (!change.reason().empty()) std::fprintf(out_, " (%s)", change.reason().c_str());
    std::fprintf(out_, "\n");
  } else if (event.has_message()) {
    const auto& message = event.message();
    const char* level = message.severity() == v1::SEVERITY_ERROR     ? "error"
                        : message.severity() == v1::SEVERITY_WARNING ? "warning"
                                                                     : "info";
    std::fprintf(out_, "#%lld %s: %s\n", static_cast<long long>(event.sequence()), level,
                 message.text().c_str());
  }
  std::fflush(out_);
}

void EventPrinter::Flush() {
  if (line_open_) {
    std::fprintf(out_, "\n");
    line_open_ = false;
  }
}

}  // namespace crossdiff::client
