// Key maps: rename the state_dict keys of a public Python implementation onto dynattn's, so its
// weights load into our modules ("timm", "cbam-official", ...). A rule rewrites a run of
// dot-separated name segments wherever it occurs ("spatial.conv.conv" -> "spatial.conv" also in
// "layer1.0.attn.spatial.conv.conv.weight"). Renaming is checked against the target module: a
// rewritten key is used only when the target has it, so one map can serve whole models; a key
// that matches nothing is an error, never silently dropped.
#pragma once
#include <torch/torch.h>

#include <string>
#include <utility>
#include <vector>

#include "dynattn/train/optimizer.h"  // NamedTensors

namespace dynattn {

struct KeyRename {
  std::string from;  // dot-separated segments, e.g. "ChannelGate.mlp.1"
  std::string to;    // e.g. "channel.fc1"
};

struct KeyMap {
  std::string name;
  std::string description;
  std::vector<KeyRename> renames;
};

// Adds (or replaces) a named key map. The built-in maps are registered on first use.
void register_key_map(KeyMap map);
const KeyMap& get_key_map(const std::string& name);
std::vector<KeyMap> list_key_maps();

// `key` with every rule of `map` applied once, in order (the key itself if none matches).
std::string rename_key(const std::string& key, const KeyMap& map);

// `source` renamed onto the parameter and buffer names of `target`, with Linear weights [O,I]
// reshaped into the 1x1 (or length-1) convolution weights [O,I,1,...] the target holds. Fails,
// naming `origin`, every key that matches nothing in `target`. The result goes to
// load_state_dict(), which reports what is still missing.
NamedTensors apply_key_map(const NamedTensors& source, const KeyMap& map,
                           const torch::nn::Module& target, const std::string& origin);

}  // namespace dynattn
