// Fashion-MNIST (Xiao et al., 2017): 28x28 grey-scale images of 10 clothing classes,
// 60000 train and 10000 test, stored as four IDX .gz files (Debian: dataset-fashion-mnist).
#pragma once
#include <torch/types.h>

#include <string>
#include <vector>

namespace dynattn {

inline constexpr const char* kFashionMnistDefaultRoot = "/usr/share/datasets/fashion-mnist";

// Per-pixel mean and (population) standard deviation of the 60000 training images on the
// [0,1] scale, computed once from the Debian files; used for normalisation.
inline constexpr double kFashionMnistMean = 0.28604059698879553;
inline constexpr double kFashionMnistStd = 0.35302424451492237;

struct FashionMnist {
  torch::Tensor train_images;  // uint8 [60000, 28, 28]
  torch::Tensor train_labels;  // int64 [60000], 0..9
  torch::Tensor test_images;   // uint8 [10000, 28, 28]
  torch::Tensor test_labels;   // int64 [10000], 0..9
};

// Loads {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz from `root` (files without the .gz
// suffix are accepted too) and checks shapes, counts and label range.
FashionMnist load_fashion_mnist(const std::string& root = kFashionMnistDefaultRoot);

// Class names indexed by label: "T-shirt/top", "Trouser", ..., "Ankle boot".
const std::vector<std::string>& fashion_mnist_classes();

}  // namespace dynattn
