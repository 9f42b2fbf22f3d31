// Memory-format conversion for whole modules. LibTorch's C++ Module::to() takes a device or a
// dtype but, unlike Python's nn.Module.to(memory_format=...), no memory format.
#pragma once
#include <torch/torch.h>

namespace dynattn {

// Converts every 4-D parameter and buffer (conv weights) of `module` to `format` in place,
// keeping their identity (optimizers and references stay valid).
inline void to_memory_format(torch::nn::Module& module, torch::MemoryFormat format) {
  torch::NoGradGuard no_grad;
  for (auto& p : module.parameters()) {
    if (p.dim() == 4) p.set_data(p.data().contiguous(format));
  }
  for (auto& b : module.buffers()) {
    if (b.dim() == 4) b.set_data(b.data().contiguous(format));
  }
}

}  // namespace dynattn
