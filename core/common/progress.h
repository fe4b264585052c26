// Progress reporting for long-running work: a rate (units/s), an ETA and free-form fields such as
// the loss. On a terminal it redraws one line; otherwise it prints a plain line at most every
// `min_interval_s` seconds. A callback receives every update too (the worker forwards them to the
// coordinator as job events).
//
// Machine-readable progress: when the environment variable CROSSDIFF_PROGRESS_FD names an open file
// descriptor, every emitted update is also written there as one JSON line
// {"phase","done","total","unit","rate","eta_s","extra","final"} (the worker daemon runs the engine's
// commands as child processes and forwards these lines to the coordinator).
//
// Thread-compatible: one thread updates a meter.
#pragma once

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>

namespace crossdiff {

struct ProgressUpdate {
  std::string phase;      // "harvest", "train", ...
  int64_t done = 0;       // units done so far
  int64_t total = 0;      // 0 when unknown
  double rate = 0;        // units per second since start
  double eta_s = -1;      // seconds left, -1 when unknown
  std::string unit;       // "tokens", "steps"
  std::string extra;      // "loss 0.123 fvu 0.2"
  bool final = false;     // true for the closing update
};

class ProgressMeter {
 public:
  using Callback = std::function<void(const ProgressUpdate&)>;

  // `out` may be nullptr (no printing). The meter detects whether `out` is a terminal.
  ProgressMeter(std::string phase, std::string unit, int64_t total, FILE* out = stderr,
                double min_interval_s = 1.0);

  void set_callback(Callback cb) { callback_ = std::move(cb); }
  void set_total(int64_t total) { total_ = total; }

  // Reports that `done` units are complete (absolute, not an increment), with optional extra text.
  // Prints/forwards at most once per interval unless `force`.
  void Update(int64_t done, const std::string& extra = "", bool force = false);
  // Prints the final line (always) and ends a terminal line with a newline.
  void Finish(int64_t done, const std::string& extra = "");

  double elapsed_s() const;
  // The JSON line written to CROSSDIFF_PROGRESS_FD (no trailing newline).
  static std::string ToJsonLine(const ProgressUpdate& u);
  // Formats seconds as "1h02m", "3m05s" or "12s".
  static std::string FormatDuration(double seconds);

 private:
  ProgressUpdate Make(int64_t done, const std::string& extra, bool final) const;
  void Emit(const ProgressUpdate& u);

  std::string phase_, unit_;
  int64_t total_;
  FILE* out_;
  bool tty_;
  double min_interval_s_;
  std::chrono::steady_clock::time_point start_, last_emit_;
  bool emitted_ = false;
  int json_fd_ = -1;
  Callback callback_;
};

}  // namespace crossdiff
