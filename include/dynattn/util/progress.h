// A terminal progress bar for training and evaluation: a redrawn line with the bar, the
// caller's statistics, the rate and the ETA when stderr is a terminal; plain log lines at
// most every `log_interval_s` seconds (and at the end) when it is not (CI logs, pipes).
#pragma once
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <string>

namespace dynattn {

class ProgressBar {
 public:
  // `interactive` < 0: decide from isatty(fileno(stream)).
  ProgressBar(std::string label, int64_t total, std::FILE* stream = stderr, int interactive = -1,
              double log_interval_s = 10.0);
  // `done` units finished; `items` (e.g. images) for the rate; `stats` e.g. "loss 0.31 acc 88%".
  void update(int64_t done, int64_t items, const std::string& stats);
  void finish(int64_t items, const std::string& stats);
  bool interactive() const { return interactive_; }

  // "1:05" / "1:02:03"
  static std::string format_duration(double seconds);

 private:
  void draw(int64_t done, int64_t items, const std::string& stats, bool final);
  std::string label_;
  int64_t total_;
  std::FILE* stream_;
  bool interactive_;
  double log_interval_s_;
  std::chrono::steady_clock::time_point start_;
  double last_draw_s_ = -1.0;
};

}  // namespace dynattn
