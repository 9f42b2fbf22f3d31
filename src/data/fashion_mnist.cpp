#include "dynattn/data/fashion_mnist.h"

#include <torch/torch.h>

#include <fstream>

#include "dynattn/data/idx.h"

namespace dynattn {
namespace {

constexpr int64_t kSide = 28;
constexpr int64_t kNumClasses = 10;

bool file_exists(const std::string& path) {
  return std::ifstream(path).good();
}

// `<root>/<stem>.gz`, or the unpacked `<root>/<stem>` if only that exists. A missing file
// is reported for the .gz name, the form the dataset is distributed in.
std::string locate(const std::string& root, const std::string& stem) {
  const std::string dir = root.empty() || root.back() == '/' ? root : root + "/";
  const std::string gz = dir + stem + ".gz";
  if (!file_exists(gz) && file_exists(dir + stem)) return dir + stem;
  return gz;
}

IdxReadOptions read_options(const std::string& root, const std::string& payload) {
  return IdxReadOptions()
      .context("fashion-mnist")
      .payload(payload)
      .missing_hint(
          "point --data at the directory holding the four Fashion-MNIST IDX .gz "
          "files (looked in '" +
          root + "'), or install the Debian package dataset-fashion-mnist (" +
          kFashionMnistDefaultRoot + ")");
}

void load_split(const std::string& root, const std::string& prefix, torch::Tensor& images,
                torch::Tensor& labels) {
  const std::string images_path = locate(root, prefix + "-images-idx3-ubyte");
  const std::string labels_path = locate(root, prefix + "-labels-idx1-ubyte");
  images = read_idx_gz(images_path, read_options(root, "image data"));
  const torch::Tensor raw_labels = read_idx_gz(labels_path, read_options(root, "label data"));

  TORCH_CHECK(images.dim() == 3 && images.size(1) == kSide && images.size(2) == kSide,
              "fashion-mnist: ", images_path, ": expected images of shape [N, 28, 28], got ",
              images.sizes());
  TORCH_CHECK(raw_labels.dim() == 1, "fashion-mnist: ", labels_path,
              ": expected labels of shape [N], got ", raw_labels.sizes());
  TORCH_CHECK(images.size(0) == raw_labels.size(0), "fashion-mnist: ", images_path, " has ",
              images.size(0), " images but ", labels_path, " has ", raw_labels.size(0), " labels");
  if (raw_labels.numel() > 0) {
    const int64_t max_label = raw_labels.max().item<int64_t>();
    if (max_label >= kNumClasses) {
      const int64_t at = raw_labels.argmax().item<int64_t>();
      TORCH_CHECK(false, "fashion-mnist: ", labels_path, ": label ", max_label, " at index ", at,
                  " is out of range; expected 0..", kNumClasses - 1);
    }
  }
  labels = raw_labels.to(torch::kInt64);
}

}  // namespace

FashionMnist load_fashion_mnist(const std::string& root) {
  FashionMnist data;
  load_split(root, "train", data.train_images, data.train_labels);
  load_split(root, "t10k", data.test_images, data.test_labels);
  return data;
}

const std::vector<std::string>& fashion_mnist_classes() {
  static const std::vector<std::string> classes = {
      "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
      "Sandal",      "Shirt",   "Sneaker",  "Bag",   "Ankle boot"};
  return classes;
}

}  // namespace dynattn
