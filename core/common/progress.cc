#include "core/common/progress.h"

#include <unistd.h>

#include <cmath>
#include <cstdlib>

#include "absl/strings/numbers.h"

#include "absl/strings/str_format.h"

namespace crossdiff {

ProgressMeter::ProgressMeter(std::string phase, std::string unit, int64_t total, FILE* out,
                             double min_interval_s)
    : phase_(std::move(phase)),
      unit_(std::move(unit)),
      total_(total),
      out_(out),
      tty_(out != nullptr && isatty(fileno(out))),
      min_interval_s_(min_interval_s),
      start_(std::chrono::steady_clock::now()),
      last_emit_(start_) {
  if (const char* fd = std::getenv("CROSSDIFF_PROGRESS_FD"); fd != nullptr) {
    int v = -1;
    if (absl::SimpleAtoi(fd, &v) && v >= 0) json_fd_ = v;
  }
}

namespace {
std::string JsonEscape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          out += absl::StrFormat("\\u%04x", c);
        } else {
          out += c;
        }
    }
  }
  return out;
}
}  // namespace

std::string ProgressMeter::ToJsonLine(const ProgressUpdate& u) {
  return absl::StrFormat(
      "{\"phase\":\"%s\",\"done\":%d,\"total\":%d,\"unit\":\"%s\",\"rate\":%.6g,"
      "\"eta_s\":%.6g,\"extra\":\"%s\",\"final\":%s}",
      JsonEscape(u.phase), u.done, u.total, JsonEscape(u.unit), u.rate, u.eta_s,
      JsonEscape(u.extra), u.final ? "true" : "false");
}

double ProgressMeter::elapsed_s() const {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
}

std::string ProgressMeter::FormatDuration(double seconds) {
  if (seconds < 0 || !std::isfinite(seconds)) return "?";
  int64_t s = static_cast<int64_t>(seconds + 0.5);
  if (s >= 3600) return absl::StrFormat("%dh%02dm", s / 3600, (s % 3600) / 60);
  if (s >= 60) return absl::StrFormat("%dm%02ds", s / 60, s % 60);
  return absl::StrFormat("%ds", s);
}

ProgressUpdate ProgressMeter::Make(int64_t done, const std::string& extra, bool final) const {
  ProgressUpdate u;
  u.phase = phase_;
  u.done = done;
  u.total = total_;
  u.unit = unit_;
  u.extra = extra;
  u.final = final;
  double t = elapsed_s();
  u.rate = t > 0 ? static_cast<double>(done) / t : 0.0;
  if (total_ > 0 && u.rate > 0) u.eta_s = static_cast<double>(total_ - done) / u.rate;
  if (final) u.eta_s = 0;
  return u;
}

void ProgressMeter::Emit(const ProgressUpdate& u) {
  if (callback_) callback_(u);
  if (json_fd_ >= 0) {
    std::string line = ToJsonLine(u) + "\n";
    // Best effort: a closed descriptor must not stop the work.
    if (::write(json_fd_, line.data(), line.size()) < 0) json_fd_ = -1;
  }
  if (out_ == nullptr) return;
  std::string line;
  if (u.total > 0) {
    double pct = 100.0 * static_cast<double>(u.done) / static_cast<double>(u.total);
    line = absl::StrFormat("[%s] %d/%d %s (%.1f%%) %.0f %s/s ETA %s", u.phase, u.done, u.total,
                           u.unit, pct, u.rate, u.unit, FormatDuration(u.eta_s));
  } else {
    line = absl::StrFormat("[%s] %d %s %.0f %s/s", u.phase, u.done, u.unit, u.rate, u.unit);
  }
  if (!u.extra.empty()) line += "  " + u.extra;
  if (tty_) {
    std::fprintf(out_, "\r\033[K%s%s", line.c_str(), u.final ? "\n" : "");
  } else {
    std::fprintf(out_, "%s\n", line.c_str());
  }
  std::fflush(out_);
}

void ProgressMeter::Update(int64_t done, const std::string& extra, bool force) {
  auto now = std::chrono::steady_clock::now();
  double since = std::chrono::duration<double>(now - last_emit_).count();
  if (!force && emitted_ && since < min_interval_s_) return;
  if (!force && !emitted_ && since < min_interval_s_ && !tty_) return;
  last_emit_ = now;
  emitted_ = true;
  Emit(Make(done, extra, false));
}

void ProgressMeter::Finish(int64_t done, const std::string& extra) {
  Emit(Make(done, extra, true));
}

}  // namespace crossdiff
