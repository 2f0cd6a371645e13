#include "common/files.h"

#include <fcntl.h>
#include <sys/uio.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <vector>

namespace tollgate {

Result<std::string> readFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{-1, "cannot read " + path};
  std::stringstream ss;
  ss << in.rdbuf();
  return ss.str();
}

namespace {

// Calls `write(from, size, done)` until all of `data` is written, retrying short writes and
// EINTR; false on an error (errno).
template <typename Write>
bool writeLoop(std::string_view data, Write write) {
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = write(data.data() + done, data.size() - done, done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      if (n == 0) errno = EIO;
      return false;
    }
    done += static_cast<size_t>(n);
  }
  return true;
}

}  // namespace

bool writeAll(int fd, std::string_view data) {
  return writeLoop(data, [fd](const char* p, size_t n, size_t) { return ::write(fd, p, n); });
}

bool pwriteAll(int fd, std::string_view data, uint64_t offset, int rwfFlags) {
  return writeLoop(data, [fd, offset, rwfFlags](const char* p, size_t n, size_t done) {
    if (rwfFlags == 0) return ::pwrite(fd, p, n, static_cast<off_t>(offset + done));
    iovec v{const_cast<char*>(p), n};
    return ::pwritev2(fd, &v, 1, static_cast<off_t>(offset + done), rwfFlags);
  });
}

Status syncDir(const std::string& dir) {
  int fd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (fd < 0) return Error{-errno, "open " + dir + ": " + std::strerror(errno)};
  int rc = ::fsync(fd);
  int saved = errno;
  ::close(fd);
  if (rc != 0) return Error{-saved, "fsync " + dir + ": " + std::strerror(saved)};
  return Status::success();
}

namespace {

// A temporary file next to `path`, filled by `fill` (false: failed, errno set), fsynced,
// renamed over `path`, and the directory fsynced.
Status replaceAtomically(const std::string& path, mode_t mode,
                         const std::function<bool(int fd)>& fill) {
  // Unique per process and call: two writers of one path (reloads from a signal and from
  // the admin API) never share a temporary file.
  static std::atomic<uint64_t> counter{0};
  std::string tmp =
      path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(counter.fetch_add(1));
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, mode);
  if (fd < 0) return Error{-errno, "open " + tmp + ": " + std::strerror(errno)};
  bool ok = fill(fd) && ::fsync(fd) == 0;
  int saved = errno;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    if (ok) saved = errno;
    ::unlink(tmp.c_str());
    return Error{-saved, "cannot write " + path + ": " + std::strerror(saved)};
  }
  auto dir = std::filesystem::path(path).parent_path();
  return syncDir(dir.empty() ? std::string(".") : dir.string());
}

}  // namespace

Status writeFileAtomic(const std::string& path, std::string_view data, mode_t mode) {
  return replaceAtomically(path, mode, [&](int fd) { return writeAll(fd, data); });
}

Status copyFileAtomic(const std::string& from, const std::string& path, mode_t mode) {
  int in = ::open(from.c_str(), O_RDONLY | O_CLOEXEC);
  if (in < 0) return Error{-errno, "open " + from + ": " + std::strerror(errno)};
  auto st = replaceAtomically(path, mode, [&](int fd) {
    std::vector<char> buf(1 << 20);
    for (;;) {
      ssize_t n = ::read(in, buf.data(), buf.size());
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0) return n == 0;
      if (!writeAll(fd, std::string_view(buf.data(), static_cast<size_t>(n)))) return false;
    }
  });
  ::close(in);
  return st;
}

}  // namespace tollgate
