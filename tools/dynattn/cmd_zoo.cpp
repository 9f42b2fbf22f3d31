// `dynattn zoo`: every registered model with its parameters and MACs per 28x28 image.
#include <cstdio>

#include "cli_common.h"
#include "dynattn/models/attention_slot.h"
#include "dynattn/models/registry.h"
#include "dynattn/profile/mac_counter.h"

namespace dynattn::cli {
namespace {

struct ZooArgs {
  std::string json;
};

void run_zoo(const ZooArgs& a, GlobalOptions g) {
  g.quiet = true;
  setup_runtime(g);
  nlohmann::json models = nlohmann::json::array();
  std::printf("%-12s %12s %14s  %s\n", "model", "parameters", "MACs/image", "description");
  for (const auto& info : list_models()) {
    Model m = create_model(info.name);
    m.ptr()->eval();
    const int64_t params = count_parameters(*m.ptr());
    auto x = torch::randn({1, 1, 28, 28});
    const int64_t macs = count_macs([&] { m.forward(x); }).macs;
    std::printf("%-12s %12lld %12.2f M  %s\n", info.name.c_str(), static_cast<long long>(params),
                macs / 1e6, info.description.c_str());
    std::string keys;
    for (const auto& k : info.option_keys) keys += (keys.empty() ? "" : ", ") + k;
    std::printf("%-12s options: %s\n", "", keys.c_str());
    models.push_back({{"name", info.name},
                      {"parameters", params},
                      {"macs_per_image", macs},
                      {"description", info.description},
                      {"options", info.option_keys}});
  }
  std::string attn;
  for (const auto& info : list_attention()) attn += (attn.empty() ? "" : ", ") + info.name;
  std::printf("\nattention slot types (option attn=...): %s\n", attn.c_str());
  if (!a.json.empty()) write_json(a.json, {{"models", models}});
}

}  // namespace

void add_zoo_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<ZooArgs>();
  auto* sub = app.add_subcommand("zoo", "list the registered models with parameters and MACs");
  sub->add_option("--json", a->json, "also write the list as JSON to this file");
  sub->callback([a, &g] { run_zoo(*a, g); });
}

}  // namespace dynattn::cli
