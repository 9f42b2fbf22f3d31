// `dynattn visualize`: a PNG sheet of test images with the spatial attention maps of a trained
// model drawn over them (CBAM and BAM spatial maps, non-local affinities of the centre query).
#include <cstdio>
#include <filesystem>

#include "cli_common.h"
#include "dynattn/core/compat.h"
#include "dynattn/data/dataset.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/io/png.h"
#include "dynattn/models/cifar_resnet.h"
#include "dynattn/viz/attention_sheet.h"

namespace dynattn::cli {
namespace {

struct VisualizeArgs {
  std::string checkpoint;
  std::string out;
  std::string data = kFashionMnistDefaultRoot;
  int64_t count = 8;
  int64_t scale = 4;
};

void run_visualize(const VisualizeArgs& a, const GlobalOptions& g) {
  setup_runtime(g);
  CheckpointData ckpt;
  Model model = load_checkpoint_model(a.checkpoint, &ckpt);
  auto* resnet = dynamic_cast<CifarResNetImpl*>(model.ptr().get());
  TORCH_CHECK(resnet != nullptr, "visualize: ", model.spec,
              " is not a ResNet with attention slots; nothing to draw");
  model.ptr()->eval();

  // The first test image of each class in turn, so the sheet shows different classes.
  const FashionMnist raw = load_fashion_mnist(a.data);
  const auto labels = raw.test_labels;
  std::vector<int64_t> picked;
  for (int64_t c = 0; static_cast<int64_t>(picked.size()) < a.count && c < 10 * a.count; ++c) {
    const auto idx = (labels == c % 10).nonzero().flatten();
    const int64_t nth = c / 10;
    if (nth < idx.size(0)) picked.push_back(idx[nth].item<int64_t>());
  }
  const auto index = torch::tensor(picked, torch::kLong);
  const auto images = raw.test_images.index_select(0, index).unsqueeze(1);
  const auto input = normalize_images(images, {kFashionMnistMean}, {kFashionMnistStd});

  AttentionOutput result;
  {
    InferenceGuard guard;
    result = resnet->forward_with_maps(input);
  }
  std::vector<std::pair<std::string, torch::Tensor>> columns;
  for (const auto& kv : result.maps) {
    auto shown = spatial_map_for_display(kv.second);
    if (shown.defined()) columns.emplace_back(kv.first, shown);
  }
  TORCH_CHECK(!columns.empty(), "visualize: ", model.spec,
              " gives no spatial attention maps (CBAM, BAM and non-local blocks do; SE and ECA "
              "only gate channels)");
  std::filesystem::create_directories(a.out);
  const std::string png = (std::filesystem::path(a.out) / "attention.png").string();
  write_png(png, attention_sheet(images, columns, AttentionSheetOptions().scale(a.scale)));

  const auto predicted = result.output.argmax(1);
  const auto& classes = fashion_mnist_classes();
  nlohmann::json rows = nlohmann::json::array();
  for (size_t i = 0; i < picked.size(); ++i) {
    rows.push_back({{"test_index", picked[i]},
                    {"label", classes[labels[picked[i]].item<int64_t>()]},
                    {"predicted", classes[predicted[static_cast<int64_t>(i)].item<int64_t>()]}});
  }
  nlohmann::json cols = nlohmann::json::array({"image"});
  for (const auto& c : columns) cols.push_back(c.first);
  write_json((std::filesystem::path(a.out) / "attention.json").string(),
             {{"model", model.spec},
              {"checkpoint", ckpt.paths.weights},
              {"columns", cols},
              {"rows", rows}});
  std::printf("wrote %s: %zu test images x (image + %zu maps)\n", png.c_str(), picked.size(),
              columns.size());
  for (const auto& c : columns) std::printf("  %s\n", c.first.c_str());
}

}  // namespace

void add_visualize_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<VisualizeArgs>();
  auto* cmd = app.add_subcommand(
      "visualize", "Draw a trained model's spatial attention maps over test images (PNG)");
  cmd->add_option("--checkpoint", a->checkpoint, "run directory or model.safetensors")->required();
  cmd->add_option("--out", a->out, "directory for attention.png and attention.json")->required();
  cmd->add_option("--data", a->data, "Fashion-MNIST directory")->capture_default_str();
  cmd->add_option("--count", a->count, "number of test images (rows)")
      ->capture_default_str()
      ->check(CLI::Range(1, 100));
  cmd->add_option("--scale", a->scale, "pixels per input pixel")
      ->capture_default_str()
      ->check(CLI::Range(1, 16));
  cmd->callback([a, &g] { run_visualize(*a, g); });
}

}  // namespace dynattn::cli
