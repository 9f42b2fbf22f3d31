// Precompiled header shared by every dynattn target (see CMakeLists.txt).
#pragma once
#include <torch/torch.h>
#include <ATen/record_function.h>
#include <algorithm>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>
