// A tiny helper for end-to-end tests of the dynattn CLI: runs a command (fork + execve, no
// shell) with stdout and stderr captured separately, reports the exit code or the signal that
// ended it, and a temporary-directory guard. Header-only; used by tests/cli/*.cpp.
#pragma once
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

extern char** environ;

namespace dynattn::cli_test {

// Quotes `s` for a POSIX shell (for messages and for copy-pasting a failing command).
inline std::string shell_quote(const std::string& s) {
  if (!s.empty() && s.find_first_not_of("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
                                        "0123456789_-+=/.,:@%") == std::string::npos) {
    return s;
  }
  std::string out = "'";
  for (char c : s) {
    if (c == '\'') {
      out += "'\\''";
    } else {
      out += c;
    }
  }
  return out + "'";
}

inline std::string join_command(const std::vector<std::string>& argv) {
  std::string out;
  for (const auto& a : argv) out += (out.empty() ? "" : " ") + shell_quote(a);
  return out;
}

// Environment changes for one run: a value sets the variable, std::nullopt removes it.
using EnvChanges = std::map<std::string, std::optional<std::string>>;

struct CommandResult {
  std::string command;  // the argv, shell-quoted
  bool exited = false;  // false: ended by a signal (or could not be run)
  int exit_code = -1;   // valid when exited
  int signal = 0;       // valid when !exited
  std::string out, err;

  // One line for assertion messages: the command, how it ended and what it printed.
  std::string describe() const {
    std::ostringstream s;
    s << "command: " << command << "\n";
    if (exited) {
      s << "exit code " << exit_code << "\n";
    } else {
      s << "killed by signal " << signal << " (" << strsignal(signal) << ")\n";
    }
    s << "--- stdout ---\n" << out << "--- stderr ---\n" << err << "---";
    return s.str();
  }
};

namespace detail {

inline void read_available(int& fd, std::string& into) {
  char buf[65536];
  const ssize_t n = ::read(fd, buf, sizeof(buf));
  if (n > 0) {
    into.append(buf, static_cast<size_t>(n));
  } else if (n == 0 || (errno != EINTR && errno != EAGAIN)) {
    ::close(fd);
    fd = -1;
  }
}

}  // namespace detail

// Runs argv[0] (a path; no PATH search) with argv, stdin from /dev/null, and the current
// environment changed by `env`. Both pipes are drained together, so a chatty child cannot
// block on a full pipe.
inline CommandResult run_command(const std::vector<std::string>& argv, const EnvChanges& env = {}) {
  CommandResult r;
  r.command = join_command(argv);
  if (!env.empty()) {
    // As `env` takes it: removals (-u) first, then assignments.
    std::string removals, assignments;
    for (const auto& kv : env) {
      if (kv.second) {
        assignments += kv.first + "=" + shell_quote(*kv.second) + " ";
      } else {
        removals += "-u " + kv.first + " ";
      }
    }
    r.command = "env " + removals + assignments + r.command;
  }

  // Everything the child needs is built before fork(): the child only calls async-signal-safe
  // functions (dup2, close, open, execve, _exit).
  std::vector<std::string> env_strings;
  for (char** e = environ; *e != nullptr; ++e) {
    const std::string entry(*e);
    const std::string name = entry.substr(0, entry.find('='));
    if (env.count(name) == 0) env_strings.push_back(entry);
  }
  for (const auto& kv : env) {
    if (kv.second) env_strings.push_back(kv.first + "=" + *kv.second);
  }
  std::vector<char*> envp, args;
  for (auto& s : env_strings) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> argv_copy = argv;
  for (auto& s : argv_copy) args.push_back(s.data());
  args.push_back(nullptr);

  int out_pipe[2], err_pipe[2];
  if (::pipe2(out_pipe, O_CLOEXEC) != 0 || ::pipe2(err_pipe, O_CLOEXEC) != 0) {
    throw std::runtime_error(std::string("pipe: ") + std::strerror(errno));
  }
  const pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error(std::string("fork: ") + std::strerror(errno));
  if (pid == 0) {
    const int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::dup2(out_pipe[1], 1);
    ::dup2(err_pipe[1], 2);
    ::execve(args[0], args.data(), envp.data());
    static const char msg[] = "cli_runner: execve failed\n";
    (void)!::write(2, msg, sizeof(msg) - 1);
    ::_exit(127);
  }
  ::close(out_pipe[1]);
  ::close(err_pipe[1]);
  int fds[2] = {out_pipe[0], err_pipe[0]};
  while (fds[0] >= 0 || fds[1] >= 0) {
    pollfd p[2];
    nfds_t n = 0;
    int which[2];
    for (int i = 0; i < 2; ++i) {
      if (fds[i] >= 0) {
        p[n] = {fds[i], POLLIN, 0};
        which[n++] = i;
      }
    }
    if (::poll(p, n, -1) < 0) {
      if (errno == EINTR) continue;
      throw std::runtime_error(std::string("poll: ") + std::strerror(errno));
    }
    for (nfds_t k = 0; k < n; ++k) {
      if (p[k].revents != 0) detail::read_available(fds[which[k]], which[k] == 0 ? r.out : r.err);
    }
  }
  int status = 0;
  while (::waitpid(pid, &status, 0) < 0) {
    if (errno != EINTR) throw std::runtime_error(std::string("waitpid: ") + std::strerror(errno));
  }
  if (WIFEXITED(status)) {
    r.exited = true;
    r.exit_code = WEXITSTATUS(status);
  } else if (WIFSIGNALED(status)) {
    r.signal = WTERMSIG(status);
  }
  return r;
}

// The dynattn executable under test: $DYNATTN_TEST_CLI if set (e.g. an installed copy), else
// the one this build made.
inline std::string dynattn_executable() {
  const char* override_path = std::getenv("DYNATTN_TEST_CLI");
  return override_path && *override_path ? override_path : DYNATTN_CLI;
}

// Runs the dynattn executable under test with `args`.
inline CommandResult run_dynattn(const std::vector<std::string>& args, const EnvChanges& env = {}) {
  std::vector<std::string> argv{dynattn_executable()};
  argv.insert(argv.end(), args.begin(), args.end());
  return run_command(argv, env);
}

// A fresh directory under $TMPDIR (or /tmp), removed with everything in it on destruction.
class TempDir {
 public:
  explicit TempDir(const std::string& prefix = "dynattn-cli-test") {
    const char* base = std::getenv("TMPDIR");
    std::string tmpl = std::string(base && *base ? base : "/tmp") + "/" + prefix + "-XXXXXX";
    if (::mkdtemp(tmpl.data()) == nullptr) {
      throw std::runtime_error("mkdtemp " + tmpl + ": " + std::strerror(errno));
    }
    path_ = tmpl;
  }
  ~TempDir() {
    std::error_code ec;
    std::filesystem::remove_all(path_, ec);
  }
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;

  const std::string& path() const { return path_; }
  std::string operator/(const std::string& name) const { return path_ + "/" + name; }

 private:
  std::string path_;
};

inline std::string read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot read " + path);
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  if (!out) throw std::runtime_error("cannot write " + path);
  out << bytes;
  if (!out) throw std::runtime_error("write failed: " + path);
}

// Writes a tiny Fashion-MNIST look-alike into `dir`: the four IDX files, uncompressed (the
// loader reads them as well as the .gz form), with `train` and `test` images of 28x28 pixels
// and labels cycling through 0..9. Enough for fast end-to-end runs of train and eval.
inline void write_tiny_fashion_mnist(const std::string& dir, int train, int test) {
  auto be32 = [](uint32_t v) {
    return std::string{static_cast<char>(v >> 24), static_cast<char>(v >> 16),
                       static_cast<char>(v >> 8), static_cast<char>(v)};
  };
  for (const auto& [prefix, n] : {std::pair<std::string, int>{"train", train}, {"t10k", test}}) {
    std::string images = be32(0x803) + be32(n) + be32(28) + be32(28);
    std::string labels = be32(0x801) + be32(n);
    for (int i = 0; i < n; ++i) {
      for (int p = 0; p < 28 * 28; ++p) images += static_cast<char>((i * 37 + p * 11) % 256);
      labels += static_cast<char>(i % 10);
    }
    write_file(dir + "/" + prefix + "-images-idx3-ubyte", images);
    write_file(dir + "/" + prefix + "-labels-idx1-ubyte", labels);
  }
}

// True for the exit codes CLI11 uses for usage errors (ParseError codes 100..115).
inline bool is_cli11_usage_code(int code) {
  return code >= 100 && code <= 115;
}

}  // namespace dynattn::cli_test
