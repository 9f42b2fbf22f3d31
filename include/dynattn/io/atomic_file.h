// Whole-file reads and crash-safe writes. write_file_atomic writes a temporary file next to
// the target, fsyncs it and rename()s it over the target (rename is atomic within a POSIX
// file system), so readers see either the old file or the complete new one, never a mix.
#pragma once
#include <string>

namespace dynattn {

// Replaces `path` with `bytes` atomically. On failure the target is left untouched, the
// temporary file is removed and a c10::Error names the path and the OS reason.
void write_file_atomic(const std::string& path, const std::string& bytes);

// The whole content of `path`; a c10::Error names the path and the OS reason on failure.
std::string read_file(const std::string& path);

}  // namespace dynattn
