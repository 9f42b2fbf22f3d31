// Learning-rate schedule: linear warm-up then cosine decay to zero (Loshchilov & Hutter,
// SGDR, ICLR 2017, without restarts), evaluated per optimisation step as timm does.
#pragma once
#include <cmath>
#include <cstdint>

namespace dynattn {

struct CosineSchedule {
  double base_lr = 0.1;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  double min_lr = 0.0;

  // lr for step s (0-based); warm-up ramps from base/warmup to base.
  double lr(int64_t s) const {
    if (s < warmup_steps) return base_lr * static_cast<double>(s + 1) / warmup_steps;
    const int64_t decay = total_steps - warmup_steps;
    if (decay <= 0) return base_lr;
    const double t = std::min(1.0, static_cast<double>(s - warmup_steps) / decay);
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + std::cos(M_PI * t));
  }
};

}  // namespace dynattn
