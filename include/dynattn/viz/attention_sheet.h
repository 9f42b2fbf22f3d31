// Attention pictures: a sheet with one row per image, the image itself in the first column and
// each attention map, upsampled to the image and drawn in a colour map over it, in the next.
#pragma once
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dynattn/attention/attention_maps.h"

namespace dynattn {

struct AttentionSheetOptions {
  TORCH_ARG(int64_t, scale) = 4;    // pixels per input pixel in the sheet
  TORCH_ARG(double, alpha) = 0.55;  // weight of the colour map over the grey image
  TORCH_ARG(int64_t, border) = 2;   // white pixels between cells
};

// values in [0,1] (any shape) -> uint8 RGB [..., 3] in the "jet" colour map (blue -> red).
torch::Tensor jet_colormap(const torch::Tensor& values);

// One map per image from an attention map as models report it, or an undefined tensor when
// the map is not spatial: [N,1,h,w] maps (CBAM/BAM spatial) as they are; [N,Q,K] affinities
// (non-local) as the row of query 0 on its square key grid (K a square number). Per image
// min-max normalised to [0,1].
torch::Tensor spatial_map_for_display(const torch::Tensor& map);

// images: [N,1,H,W] (any range; each image is min-max normalised for display). maps: titled
// [N,h,w] tensors in [0,1]. Returns uint8 RGB [rows, cols, 3], ready for write_png().
torch::Tensor attention_sheet(const torch::Tensor& images,
                              const std::vector<std::pair<std::string, torch::Tensor>>& maps,
                              const AttentionSheetOptions& options = AttentionSheetOptions());

}  // namespace dynattn
