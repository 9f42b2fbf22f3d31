#include "dynattn/util/progress.h"

#include <unistd.h>

#include <algorithm>
#include <cmath>

namespace dynattn {

ProgressBar::ProgressBar(std::string label, int64_t total, std::FILE* stream, int interactive,
                         double log_interval_s)
    : label_(std::move(label)),
      total_(std::max<int64_t>(total, 1)),
      stream_(stream),
      interactive_(interactive < 0 ? isatty(fileno(stream)) != 0 : interactive != 0),
      log_interval_s_(log_interval_s),
      start_(std::chrono::steady_clock::now()) {}

std::string ProgressBar::format_duration(double seconds) {
  if (!std::isfinite(seconds) || seconds < 0) return "?";
  const int64_t s = static_cast<int64_t>(std::llround(seconds));
  char buf[32];
  if (s >= 3600) {
    std::snprintf(buf, sizeof(buf), "%lld:%02lld:%02lld", static_cast<long long>(s / 3600),
                  static_cast<long long>((s / 60) % 60), static_cast<long long>(s % 60));
  } else {
    std::snprintf(buf, sizeof(buf), "%lld:%02lld", static_cast<long long>(s / 60),
                  static_cast<long long>(s % 60));
  }
  return buf;
}

void ProgressBar::update(int64_t done, int64_t items, const std::string& stats) {
  const double now =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  // Redraw a terminal at most 10 times a second; log lines at most every log_interval_s.
  const double interval = interactive_ ? 0.1 : log_interval_s_;
  if (last_draw_s_ >= 0 && now - last_draw_s_ < interval) return;
  last_draw_s_ = now;
  draw(done, items, stats, false);
}

void ProgressBar::finish(int64_t items, const std::string& stats) {
  draw(total_, items, stats, true);
}

void ProgressBar::draw(int64_t done, int64_t items, const std::string& stats, bool final) {
  const double elapsed =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
  const double frac = std::min(1.0, static_cast<double>(done) / total_);
  const double rate = elapsed > 0 ? items / elapsed : 0.0;
  const double eta = frac > 0 ? elapsed * (1.0 - frac) / frac : -1.0;
  char tail[128];
  std::snprintf(tail, sizeof(tail), "%.0f img/s  %s", rate,
                final ? ("took " + format_duration(elapsed)).c_str()
                      : ("ETA " + format_duration(eta)).c_str());
  if (interactive_) {
    constexpr int kWidth = 24;
    const int filled = static_cast<int>(frac * kWidth);
    std::string bar(filled, '#');
    bar += std::string(kWidth - filled, '.');
    std::fprintf(stream_, "\r\033[K%s [%s] %lld/%lld  %s  %s", label_.c_str(), bar.c_str(),
                 static_cast<long long>(done), static_cast<long long>(total_), stats.c_str(), tail);
    if (final) std::fputc('\n', stream_);
  } else {
    std::fprintf(stream_, "%s %lld/%lld (%3.0f%%)  %s  %s\n", label_.c_str(),
                 static_cast<long long>(done), static_cast<long long>(total_), 100.0 * frac,
                 stats.c_str(), tail);
  }
  std::fflush(stream_);
}

}  // namespace dynattn
