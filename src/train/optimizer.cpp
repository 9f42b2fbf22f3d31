#include "dynattn/train/optimizer.h"

#include <map>

namespace dynattn {
namespace {

std::map<std::string, torch::Tensor> to_map(const NamedTensors& v) {
  return std::map<std::string, torch::Tensor>(v.begin(), v.end());
}

torch::Tensor take(const std::map<std::string, torch::Tensor>& m, const std::string& key,
                   const torch::Tensor& like, const std::string& origin) {
  auto it = m.find(key);
  TORCH_CHECK(it != m.end(), "optimizer state ", origin, ": missing '", key, "'");
  TORCH_CHECK(it->second.sizes() == like.sizes(), "optimizer state ", origin, ": '", key,
              "' has shape ", it->second.sizes(), ", expected ", like.sizes());
  return it->second.to(like.options()).clone();
}

class Sgd : public Optimizer {
 public:
  Sgd(NamedTensors params, const OptimizerOptions& o) : Optimizer(std::move(params), o) {
    buffers_.resize(params_.size());
  }

  // torch.optim.SGD: d = g + wd*p; b = m*b + d (b = d at the first step);
  // d = d + m*b (Nesterov) or b; p -= lr*d.
  void step() override {
    torch::NoGradGuard no_grad;
    const double m = options_.momentum();
    for (size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i].second;
      if (!p.grad().defined()) continue;
      auto d = p.grad();
      const double wd = decay_for(i);
      if (wd != 0.0) d = d.add(p, wd);
      if (m != 0.0) {
        auto& b = buffers_[i];
        if (!b.defined()) {
          b = d.clone();
        } else {
          b.mul_(m).add_(d);
        }
        d = options_.nesterov() ? d.add(b, m) : b;
      }
      p.add_(d, -lr_);
    }
  }

  NamedTensors state() const override {
    NamedTensors out;
    for (size_t i = 0; i < params_.size(); ++i) {
      if (buffers_[i].defined())
        out.emplace_back(params_[i].first + ".momentum_buffer", buffers_[i]);
    }
    return out;
  }

  void load_state(const NamedTensors& state, const std::string& origin) override {
    const auto m = to_map(state);
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string key = params_[i].first + ".momentum_buffer";
      buffers_[i] = m.count(key) ? take(m, key, params_[i].second, origin) : torch::Tensor();
    }
  }

 private:
  std::vector<torch::Tensor> buffers_;
};

class AdamW : public Optimizer {
 public:
  AdamW(NamedTensors params, const OptimizerOptions& o) : Optimizer(std::move(params), o) {
    exp_avg_.resize(params_.size());
    exp_avg_sq_.resize(params_.size());
  }

  // torch.optim.AdamW: p *= 1 - lr*wd; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
  // p -= lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps).
  void step() override {
    torch::NoGradGuard no_grad;
    ++step_;
    const double b1 = options_.beta1(), b2 = options_.beta2();
    const double bc1 = 1.0 - std::pow(b1, static_cast<double>(step_));
    const double bc2 = 1.0 - std::pow(b2, static_cast<double>(step_));
    for (size_t i = 0; i < params_.size(); ++i) {
      auto& p = params_[i].second;
      if (!p.grad().defined()) continue;
      const auto& g = p.grad();
      if (!exp_avg_[i].defined()) {
        exp_avg_[i] = torch::zeros_like(p);
        exp_avg_sq_[i] = torch::zeros_like(p);
      }
      const double wd = decay_for(i);
      if (wd != 0.0) p.mul_(1.0 - lr_ * wd);
      exp_avg_[i].mul_(b1).add_(g, 1.0 - b1);
      exp_avg_sq_[i].mul_(b2).addcmul_(g, g, 1.0 - b2);
      auto denom = (exp_avg_sq_[i] / bc2).sqrt_().add_(options_.eps());
      p.addcdiv_(exp_avg_[i], denom, -lr_ / bc1);
    }
  }

  NamedTensors state() const override {
    NamedTensors out;
    out.emplace_back("step", torch::tensor(step_, torch::kInt64));
    for (size_t i = 0; i < params_.size(); ++i) {
      if (!exp_avg_[i].defined()) continue;
      out.emplace_back(params_[i].first + ".exp_avg", exp_avg_[i]);
      out.emplace_back(params_[i].first + ".exp_avg_sq", exp_avg_sq_[i]);
    }
    return out;
  }

  void load_state(const NamedTensors& state, const std::string& origin) override {
    const auto m = to_map(state);
    auto it = m.find("step");
    TORCH_CHECK(it != m.end() && it->second.numel() == 1, "optimizer state ", origin,
                ": missing 'step' (is this an AdamW state?)");
    step_ = it->second.item<int64_t>();
    for (size_t i = 0; i < params_.size(); ++i) {
      const std::string key = params_[i].first + ".exp_avg";
      if (!m.count(key)) continue;
      exp_avg_[i] = take(m, key, params_[i].second, origin);
      exp_avg_sq_[i] = take(m, params_[i].first + ".exp_avg_sq", params_[i].second, origin);
    }
  }

 private:
  int64_t step_ = 0;
  std::vector<torch::Tensor> exp_avg_, exp_avg_sq_;
};

}  // namespace

Optimizer::Optimizer(NamedTensors params, const OptimizerOptions& options)
    : params_(std::move(params)), options_(options), lr_(options.lr()) {
  TORCH_CHECK(options.lr() > 0, "optimizer: learning rate must be positive, got ", options.lr());
  TORCH_CHECK(options.weight_decay() >= 0, "optimizer: weight decay must be >= 0, got ",
              options.weight_decay());
}

void Optimizer::zero_grad() {
  for (auto& p : params_) {
    if (p.second.grad().defined()) p.second.mutable_grad() = torch::Tensor();
  }
}

double Optimizer::decay_for(size_t i) const {
  if (!options_.decay_norm_and_bias() && params_[i].second.dim() <= 1) return 0.0;
  return options_.weight_decay();
}

std::unique_ptr<Optimizer> make_optimizer(const torch::nn::Module& model,
                                          const OptimizerOptions& options) {
  NamedTensors params;
  for (const auto& p : model.named_parameters()) {
    if (p.value().requires_grad()) params.emplace_back(p.key(), p.value());
  }
  if (options.name() == "sgd") return std::make_unique<Sgd>(std::move(params), options);
  if (options.name() == "adamw") return std::make_unique<AdamW>(std::move(params), options);
  TORCH_CHECK(false, "optimizer: unknown '", options.name(), "' (known: sgd, adamw)");
}

}  // namespace dynattn
