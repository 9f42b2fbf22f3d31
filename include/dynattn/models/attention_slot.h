// The attention slot: a string-keyed factory that creates the attention module a backbone
// inserts for a given channel count, the way timm's `create_attn(attn_layer, channels)` does.
// Specs are option strings: "none", "se", "se:r=8". Backbones take a spec, never a type.
#pragma once
#include <torch/torch.h>

#include <functional>
#include <string>
#include <vector>

#include "dynattn/core/options_string.h"

namespace dynattn {

// Creates the module for `channels` input channels; it must map [N,C,H,W] -> [N,C,H,W].
using AttentionBuilder =
    std::function<torch::nn::AnyModule(int64_t channels, const OptionMap& options)>;

struct AttentionInfo {
  std::string name;
  std::string description;
  AttentionBuilder build;
};

// Adds (or replaces) a named attention type. Built-in types are registered on first use.
void register_attention(AttentionInfo info);

// Returns an empty AnyModule for "none" (the slot then costs nothing at run time).
// Unknown names and bad options fail with an error that lists the known names.
torch::nn::AnyModule create_attention(const std::string& spec, int64_t channels);

std::vector<AttentionInfo> list_attention();

}  // namespace dynattn
