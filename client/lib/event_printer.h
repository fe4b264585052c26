// Renders job events for people: on a terminal, progress events redraw one status line (a bar with
// rate and ETA); elsewhere every event is one plain line. Not thread-safe.
#pragma once

#include <cstdio>
#include <string>

#include "crossdiff/v1/job.pb.h"

namespace crossdiff::client {

class EventPrinter {
 public:
  // `tty` forces the terminal mode on or off (tests); by default it follows isatty(out).
  explicit EventPrinter(FILE* out);
  EventPrinter(FILE* out, bool tty) : out_(out), tty_(tty) {}
  void Print(const v1::JobEvent& event);
  // Ends a pending progress line.
  void Flush();

  // One line, without newline: "harvest 12000/20000 tokens (60%) 1500 tokens/s ETA 5s".
  static std::string FormatProgress(const v1::JobProgress& progress);
  // "QUEUED", "HARVESTING", ... (the enum name without its prefix).
  static std::string StateName(v1::JobState state);

 private:
  FILE* out_;
  bool tty_;
  bool line_open_ = false;
};

}  // namespace crossdiff::client
