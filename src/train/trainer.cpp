#include "dynattn/train/trainer.h"

#include <chrono>
#include <cmath>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <tuple>

#include "dynattn/core/compat.h"
#include "dynattn/core/memory_format.h"
#include "dynattn/core/version.h"
#include "dynattn/io/atomic_file.h"
#include "dynattn/io/checkpoint.h"
#include "dynattn/train/evaluate.h"
#include "dynattn/train/schedule.h"
#include "dynattn/train/training_loss.h"
#include "dynattn/util/progress.h"

namespace dynattn {
namespace {

using Clock = std::chrono::steady_clock;

nlohmann::json record_to_json(const EpochRecord& r) {
  return {{"epoch", r.epoch},
          {"lr", r.lr},
          {"train_loss", r.train_loss},
          {"train_accuracy", r.train_accuracy},
          {"val_loss", r.val_loss},
          {"val_accuracy", r.val_accuracy},
          {"train_images_per_sec", r.train_images_per_sec},
          {"seconds", r.seconds}};
}

EpochRecord record_from_json(const nlohmann::json& j) {
  EpochRecord r;
  r.epoch = j.at("epoch").get<int64_t>();
  r.lr = j.at("lr").get<double>();
  r.train_loss = j.at("train_loss").get<double>();
  r.train_accuracy = j.at("train_accuracy").get<double>();
  r.val_loss = j.at("val_loss").get<double>();
  r.val_accuracy = j.at("val_accuracy").get<double>();
  r.train_images_per_sec = j.at("train_images_per_sec").get<double>();
  r.seconds = j.at("seconds").get<double>();
  return r;
}

nlohmann::json options_to_json(const TrainOptions& o) {
  const auto& opt = o.optimizer();
  return {{"epochs", o.epochs()},
          {"batch_size", o.batch_size()},
          {"optimizer",
           {{"name", opt.name()},
            {"lr", opt.lr()},
            {"momentum", opt.momentum()},
            {"nesterov", opt.nesterov()},
            {"weight_decay", opt.weight_decay()},
            {"beta1", opt.beta1()},
            {"beta2", opt.beta2()},
            {"eps", opt.eps()},
            {"decay_norm_and_bias", opt.decay_norm_and_bias()}}},
          {"warmup_epochs", o.warmup_epochs()},
          {"label_smoothing", o.label_smoothing()},
          {"crop_padding", o.crop_padding()},
          {"flip", o.flip()},
          {"seed", o.seed()},
          {"channels_last", o.channels_last()},
          {"mean", o.mean()},
          {"stddev", o.stddev()}};
}

void make_dirs(const std::string& path) {
  std::error_code ec;
  std::filesystem::create_directories(path, ec);
  TORCH_CHECK(!ec && std::filesystem::is_directory(path), "train: cannot create output directory '",
              path, "': ", ec ? ec.message() : "exists and is not a directory");
}

StepOutput default_step(Model& model, const torch::Tensor& images, const torch::Tensor& labels,
                        double label_smoothing) {
  StepOutput out;
  // A model with its own training loss (e.g. BranchyNet's joint loss over its exits).
  if (auto* own = dynamic_cast<ProvidesTrainingLoss*>(model.ptr().get())) {
    std::tie(out.loss, out.logits) = own->training_loss(images, labels, label_smoothing);
    return out;
  }
  out.logits = model.forward(images);
  out.loss = torch::nn::functional::cross_entropy(
      out.logits, labels,
      torch::nn::functional::CrossEntropyFuncOptions().label_smoothing(label_smoothing));
  return out;
}

}  // namespace

std::string epoch_record_json(const EpochRecord& r) {
  return record_to_json(r).dump();
}

TrainResult train_model(Model& model, const InMemoryDataset& train, const InMemoryDataset* val,
                        const TrainOptions& o, const TrainHooks& hooks) {
  TORCH_CHECK(o.epochs() > 0, "train: --epochs must be positive, got ", o.epochs());
  TORCH_CHECK(o.batch_size() > 0, "train: --batch must be positive, got ", o.batch_size());
  TORCH_CHECK(o.label_smoothing() >= 0 && o.label_smoothing() < 1,
              "train: label smoothing must be in [0, 1), got ", o.label_smoothing());
  TORCH_CHECK(train.size() > 0, "train: the training set is empty");
  auto& net = *model.ptr();
  net.to(o.device());
  if (o.channels_last()) to_memory_format(net, torch::MemoryFormat::ChannelsLast);
  auto optimizer = make_optimizer(net, o.optimizer());

  TrainResult result;
  int64_t first_epoch = 1;
  const bool checkpoints = !o.out_dir().empty();
  if (checkpoints) make_dirs(o.out_dir());
  if (o.resume()) {
    TORCH_CHECK(checkpoints, "train: --resume needs --out (the run directory to resume)");
    CheckpointData ckpt = read_checkpoint(o.out_dir(), /*with_optimizer=*/true);
    TORCH_CHECK(ckpt.model_spec == model.spec, "train: cannot resume ", o.out_dir(),
                ": it holds model '", ckpt.model_spec, "', not '", model.spec, "'");
    load_state_dict(net, ckpt.weights, ckpt.paths.weights);
    optimizer->load_state(ckpt.optimizer, ckpt.paths.optimizer);
    const auto meta = nlohmann::json::parse(ckpt.meta_json);
    if (meta.contains("history")) {
      for (const auto& r : meta["history"]) result.history.push_back(record_from_json(r));
    }
    first_epoch = ckpt.epoch + 1;
    std::fprintf(stderr, "resuming %s from epoch %lld\n", o.out_dir().c_str(),
                 static_cast<long long>(ckpt.epoch));
  }

  DataLoaderOptions load;
  load.batch_size(o.batch_size())
      .shuffle(true)
      .drop_last(true)
      .seed(o.seed())
      .augment(AugmentOptions().crop_padding(o.crop_padding()).horizontal_flip(o.flip()))
      .mean(o.mean())
      .stddev(o.stddev())
      .device(o.device())
      .channels_last(o.channels_last());
  DataLoader loader(train, load);
  int64_t batches = loader.num_batches();
  TORCH_CHECK(batches > 0, "train: the training set (", train.size(),
              " images) is smaller than one batch of ", o.batch_size());
  if (o.max_batches() > 0) batches = std::min(batches, o.max_batches());

  CosineSchedule schedule;
  schedule.base_lr = o.optimizer().lr();
  schedule.total_steps = o.epochs() * batches;
  schedule.warmup_steps = static_cast<int64_t>(std::llround(o.warmup_epochs() * batches));

  const auto extra = nlohmann::json::parse(o.extra_meta_json());
  for (int64_t epoch = first_epoch; epoch <= o.epochs(); ++epoch) {
    net.train();
    loader.start_epoch(epoch);
    const auto start = Clock::now();
    ProgressBar bar("epoch " + std::to_string(epoch) + "/" + std::to_string(o.epochs()), batches,
                    stderr, o.progress(), 10.0);
    // Sums stay on the device; reading the loss each step is needed for the NaN check anyway.
    double loss_sum = 0.0;
    int64_t correct = 0, seen = 0;
    for (int64_t b = 0; b < batches; ++b) {
      const int64_t step = (epoch - 1) * batches + b;
      optimizer->set_lr(schedule.lr(step));
      Batch batch = loader.batch(b);
      StepOutput out = hooks.step
                           ? hooks.step(model, batch.images, batch.labels)
                           : default_step(model, batch.images, batch.labels, o.label_smoothing());
      const double loss = out.loss.item<double>();
      if (!std::isfinite(loss)) {
        result.stopped = true;
        result.stop_reason = "loss is " + std::string(std::isnan(loss) ? "NaN" : "infinite") +
                             " at epoch " + std::to_string(epoch) + ", batch " +
                             std::to_string(b + 1) + " (lr " + c10::str(optimizer->lr()) + ")" +
                             (checkpoints && epoch > 1
                                  ? "; the last good checkpoint (epoch " +
                                        std::to_string(epoch - 1) + ") is kept in " + o.out_dir()
                                  : "; no checkpoint was written");
        if (o.progress() != 0) std::fprintf(stderr, "\n");
        return result;
      }
      optimizer->zero_grad();
      out.loss.backward();
      optimizer->step();
      const int64_t n = batch.labels.size(0);
      loss_sum += loss * n;
      correct += out.logits.argmax(1).eq(batch.labels).sum().item<int64_t>();
      seen += n;
      if (o.progress() != 0) {
        char stats[96];
        std::snprintf(stats, sizeof(stats), "loss %.4f acc %.2f%% lr %.4g", loss_sum / seen,
                      100.0 * correct / seen, optimizer->lr());
        bar.update(b + 1, seen, stats);
      }
    }
    const double train_seconds = std::chrono::duration<double>(Clock::now() - start).count();
    EpochRecord rec;
    rec.epoch = epoch;
    rec.lr = optimizer->lr();
    rec.train_loss = loss_sum / seen;
    rec.train_accuracy = static_cast<double>(correct) / seen;
    rec.train_images_per_sec = seen / train_seconds;
    if (val && val->size() > 0) {
      auto ev = evaluate(model, *val,
                         EvalOptions()
                             .batch_size(256)
                             .channels_last(o.channels_last())
                             .device(o.device())
                             .mean(o.mean())
                             .stddev(o.stddev()));
      rec.val_loss = ev.loss;
      rec.val_accuracy = ev.accuracy;
    }
    rec.seconds = std::chrono::duration<double>(Clock::now() - start).count();
    result.history.push_back(rec);
    if (o.progress() != 0) {
      char stats[160];
      std::snprintf(
          stats, sizeof(stats), "loss %.4f acc %.2f%%%s", rec.train_loss,
          100.0 * rec.train_accuracy,
          val ? (" | val acc " + std::to_string(100.0 * rec.val_accuracy).substr(0, 5) + "%")
                    .c_str()
              : "");
      bar.finish(seen, stats);
    }

    if (checkpoints) {
      nlohmann::json meta = extra;
      meta["model"] = model.spec;
      meta["epoch"] = epoch;
      meta["dynattn_version"] = version();
      meta["torch_version"] = torch_version_string();
      meta["train_options"] = options_to_json(o);
      meta["metrics"] = record_to_json(rec);
      meta["history"] = nlohmann::json::array();
      std::string jsonl;
      for (const auto& r : result.history) {
        meta["history"].push_back(record_to_json(r));
        jsonl += record_to_json(r).dump() + "\n";
      }
      save_checkpoint(o.out_dir(), net, meta.dump(), optimizer->state());
      write_file_atomic(o.out_dir() + "/metrics.jsonl", jsonl);
    }
  }
  return result;
}

}  // namespace dynattn
