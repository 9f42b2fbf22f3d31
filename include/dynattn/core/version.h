// dynattn's own version ("0.1.0"), for banners, saved checkpoints and `dynattn --version`.
// It is compiled into the library, so it names the library actually linked, not the headers.
#pragma once
#include <string>

namespace dynattn {

std::string version();

}  // namespace dynattn
