#include "dynattn/io/atomic_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <torch/torch.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>

namespace dynattn {
namespace {

// Closes the descriptor and removes the temporary file unless release()d, so every early
// exit (including exceptions) cleans up.
class TempFileGuard {
 public:
  TempFileGuard(int fd, std::string path) : fd_(fd), path_(std::move(path)) {}
  ~TempFileGuard() {
    if (fd_ >= 0) ::close(fd_);
    if (!path_.empty()) ::unlink(path_.c_str());
  }
  // Closes now so that a failing close() (e.g. deferred write errors on NFS) is reported.
  int close() {
    const int rc = ::close(fd_);
    fd_ = -1;
    return rc;
  }
  void release() { path_.clear(); }

 private:
  int fd_;
  std::string path_;
};

[[noreturn]] void fail(const char* what, const std::string& path) {
  const int err = errno;
  TORCH_CHECK(false, "cannot ", what, " '", path, "': ", std::strerror(err));
}

std::string directory_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  return slash == 0 ? "/" : path.substr(0, slash);
}

}  // namespace

void write_file_atomic(const std::string& path, const std::string& bytes) {
  // pid + counter keeps concurrent writers (threads or processes) off each other's temp file.
  static std::atomic<uint64_t> counter{0};
  const std::string tmp =
      path + ".tmp." + std::to_string(::getpid()) + "." + std::to_string(counter++);
  const int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
  if (fd < 0) fail("write", path);
  TempFileGuard guard(fd, tmp);

  // Replacing a file should not silently change its permissions.
  struct stat st;
  if (::stat(path.c_str(), &st) == 0 && S_ISREG(st.st_mode)) ::fchmod(fd, st.st_mode & 07777);

  size_t done = 0;
  while (done < bytes.size()) {
    const ssize_t n = ::write(fd, bytes.data() + done, bytes.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("write", path);
    done += static_cast<size_t>(n);
  }
  // Without fsync the rename can reach the disk before the data, and a crash would leave
  // an empty or truncated file under the final name.
  if (::fsync(fd) != 0) fail("write", path);
  if (guard.close() != 0) fail("write", path);
  if (::rename(tmp.c_str(), path.c_str()) != 0) fail("write", path);
  guard.release();

  // Makes the rename itself durable. Best effort: some file systems refuse fsync on a
  // directory, and the new file is already complete either way.
  const int dir_fd = ::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dir_fd >= 0) {
    ::fsync(dir_fd);
    ::close(dir_fd);
  }
}

std::string read_file(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) fail("open", path);
  TempFileGuard guard(fd, "");
  struct stat st;
  if (::fstat(fd, &st) != 0) fail("read", path);
  if (S_ISDIR(st.st_mode)) {
    errno = EISDIR;
    fail("read", path);
  }
  std::string bytes;
  if (S_ISREG(st.st_mode)) bytes.reserve(static_cast<size_t>(st.st_size));
  char buf[1 << 16];
  while (true) {
    const ssize_t n = ::read(fd, buf, sizeof(buf));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail("read", path);
    if (n == 0) break;
    bytes.append(buf, static_cast<size_t>(n));
  }
  return bytes;
}

}  // namespace dynattn
