// `dynattn train`: trains a registered model on Fashion-MNIST.
#include <cstdio>

#include "cli_common.h"
#include "dynattn/data/fashion_mnist.h"
#include "dynattn/models/registry.h"
#include "dynattn/profile/mac_counter.h"
#include "dynattn/train/evaluate.h"
#include "dynattn/train/trainer.h"

namespace dynattn::cli {
namespace {

struct TrainArgs {
  std::string model = "resnet20";
  std::string attn;
  std::string data = kFashionMnistDefaultRoot;
  std::string out;
  int64_t epochs = 30;
  int64_t batch = 128;
  std::string optimizer = "sgd";
  double lr = 0.1;
  double momentum = 0.9;
  bool no_nesterov = false;
  double weight_decay = 5e-4;
  double warmup = 1.0;
  double label_smoothing = 0.0;
  int64_t crop_padding = 0;
  bool flip = false;
  double val_split = 0.0;
  uint64_t seed = 0;
  bool resume = false;
  bool channels_last = false;
  int64_t max_batches = 0;
};

void run_train(const TrainArgs& a, const GlobalOptions& g) {
  setup_runtime(g);
  torch::manual_seed(a.seed);
  const torch::Device device = parse_device(g.device);
  Model model = create_model(model_with_attention(a.model, a.attn));
  auto splits = load_fashion_mnist_splits(a.data, a.val_split, a.seed);
  std::fprintf(stderr, "model %s: %lld parameters; data %s: %lld train, %lld val, %lld test\n",
               model.spec.c_str(), static_cast<long long>(count_parameters(*model.ptr())),
               a.data.c_str(), static_cast<long long>(splits.train.size()),
               static_cast<long long>(splits.val.size()),
               static_cast<long long>(splits.test.size()));
  TrainOptions o;
  o.epochs(a.epochs)
      .batch_size(a.batch)
      .optimizer(OptimizerOptions()
                     .name(a.optimizer)
                     .lr(a.lr)
                     .momentum(a.momentum)
                     .nesterov(!a.no_nesterov)
                     .weight_decay(a.weight_decay))
      .warmup_epochs(a.warmup)
      .label_smoothing(a.label_smoothing)
      .crop_padding(a.crop_padding)
      .flip(a.flip)
      .seed(a.seed)
      .channels_last(a.channels_last)
      .device(device)
      .mean({kFashionMnistMean})
      .stddev({kFashionMnistStd})
      .out_dir(a.out)
      .resume(a.resume)
      .max_batches(a.max_batches)
      .extra_meta_json(nlohmann::json{{"data", a.data}, {"val_split", a.val_split}}.dump());
  TrainResult result = train_model(model, splits.train, a.val_split > 0 ? &splits.val : nullptr, o);
  if (result.stopped) {
    std::fprintf(stderr, "dynattn: training stopped: %s\n", result.stop_reason.c_str());
    throw CLI::RuntimeError(2);
  }
  auto ev = evaluate(model, splits.test,
                     EvalOptions()
                         .channels_last(a.channels_last)
                         .device(device)
                         .mean({kFashionMnistMean})
                         .stddev({kFashionMnistStd}));
  std::printf("test accuracy %.2f%% (%lld images), loss %.4f\n", 100.0 * ev.accuracy,
              static_cast<long long>(ev.count), ev.loss);
  if (!a.out.empty()) {
    write_json(a.out + "/test.json", {{"model", model.spec},
                                      {"test_accuracy", ev.accuracy},
                                      {"test_loss", ev.loss},
                                      {"per_class_accuracy", ev.per_class}});
    std::printf("checkpoint and metrics in %s\n", a.out.c_str());
  }
}

}  // namespace

void add_train_command(CLI::App& app, GlobalOptions& g) {
  auto a = std::make_shared<TrainArgs>();
  auto* sub = app.add_subcommand("train", "train a model on Fashion-MNIST");
  sub->add_option("--model", a->model, "model spec, e.g. resnet20 or resnet56:width=32")
      ->capture_default_str();
  sub->add_option("--attn", a->attn,
                  "attention in every block, e.g. se or cbam:r=8 (same as the model option attn)");
  sub->add_option("--data", a->data, "Fashion-MNIST directory (IDX .gz files)")
      ->capture_default_str();
  sub->add_option("--out", a->out, "run directory: checkpoint every epoch, metrics.jsonl");
  sub->add_option("--epochs", a->epochs, "epochs")->capture_default_str()->check(kPositive);
  sub->add_option("--batch", a->batch, "batch size")->capture_default_str()->check(kPositive);
  sub->add_option("--optimizer", a->optimizer, "sgd or adamw")
      ->capture_default_str()
      ->check(CLI::IsMember({"sgd", "adamw"}));
  sub->add_option("--lr", a->lr, "peak learning rate")->capture_default_str()->check(kPositive);
  sub->add_option("--momentum", a->momentum, "SGD momentum")->capture_default_str();
  sub->add_flag("--no-nesterov", a->no_nesterov, "plain momentum instead of Nesterov");
  sub->add_option("--wd", a->weight_decay, "weight decay (decoupled for adamw)")
      ->capture_default_str();
  sub->add_option("--warmup", a->warmup, "linear warm-up epochs before the cosine decay")
      ->capture_default_str();
  sub->add_option("--label-smoothing", a->label_smoothing, "label smoothing")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.99));
  sub->add_option("--crop-padding", a->crop_padding, "random crop with this zero padding (0: off)")
      ->capture_default_str();
  sub->add_flag("--flip", a->flip, "random horizontal flips");
  sub->add_option("--val-split", a->val_split, "fraction of train held out for validation")
      ->capture_default_str()
      ->check(CLI::Range(0.0, 0.9));
  sub->add_option("--seed", a->seed, "seed for init, shuffling and augmentation")
      ->capture_default_str();
  sub->add_flag("--resume", a->resume, "continue the run in --out from its last checkpoint");
  sub->add_flag("--channels-last", a->channels_last, "train in channels-last memory format");
  sub->add_option("--device", g.device, "cpu or cuda[:N]")->capture_default_str();
  sub->add_option("--max-batches", a->max_batches, "cap batches per epoch, 0: all (smoke runs)")
      ->check(kNonNegative);
  sub->callback([a, &g] { run_train(*a, g); });
}

}  // namespace dynattn::cli
