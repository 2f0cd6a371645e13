#include "proxy/policy_watch.h"

#include <sys/inotify.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>

#include "common/log.h"

namespace tollgate {
namespace fs = std::filesystem;

namespace {

// What ends an edit of a directory entry. IN_MODIFY is not among them: it comes with every
// write of one still going on.
constexpr uint32_t kEntryEvents =
    IN_CLOSE_WRITE | IN_MOVED_TO | IN_MOVED_FROM | IN_DELETE | IN_CREATE;
constexpr uint32_t kSelfEvents = IN_DELETE_SELF | IN_MOVE_SELF | IN_IGNORED;

}  // namespace

PolicyWatch::PolicyWatch(uv_loop_t* loop, std::vector<std::string> files,
                         std::function<void()> onChange)
    : loop_(loop), files_(std::move(files)), onChange_(std::move(onChange)) {}

PolicyWatch::~PolicyWatch() {
  if (fd_ >= 0) ::close(fd_);
}

bool PolicyWatch::start() {
  fd_ = ::inotify_init1(IN_NONBLOCK | IN_CLOEXEC);
  if (fd_ < 0) {
    Log::Line(LogLevel::kWarn, "cannot watch policies")
        .add("error", std::string(std::strerror(errno)))
        .add("hint", "edits are not seen: reload with SIGHUP or POST /v1/reload")
        .emit();
    return false;
  }
  uv_timer_init(loop_, &debounce_);
  debounce_.data = this;
  uv_poll_init(loop_, &poll_, fd_);
  poll_.data = this;
  uv_poll_start(&poll_, UV_READABLE, [](uv_poll_t* p, int status, int) {
    if (status == 0) static_cast<PolicyWatch*>(p->data)->onReadable();
  });
  started_ = true;
  arm();
  return true;
}

void PolicyWatch::close() {
  if (!started_ || closed_) return;
  closed_ = true;
  uv_close(reinterpret_cast<uv_handle_t*>(&poll_), nullptr);
  uv_close(reinterpret_cast<uv_handle_t*>(&debounce_), nullptr);
}

void PolicyWatch::watch(const std::string& dir, const std::string& name) {
  int wd = ::inotify_add_watch(fd_, dir.c_str(), kEntryEvents | kSelfEvents | IN_ONLYDIR);
  if (wd < 0) {
    Log::Line(LogLevel::kWarn, "cannot watch policies")
        .add("dir", dir)
        .add("error", std::string(std::strerror(errno)))
        .emit();
    return;
  }
  auto& d = dirs_[wd];  // one watch per directory (inode), however it was reached
  d.path = dir;
  d.names.insert(name);
}

void PolicyWatch::arm() {
  for (const auto& [wd, dir] : dirs_) ::inotify_rm_watch(fd_, wd);
  dirs_.clear();
  for (const auto& file : files_) {
    fs::path path(file);
    fs::path dir = path.parent_path().empty() ? fs::path(".") : path.parent_path();
    // The file's own directory (through any links: inotify follows them), for the file and
    // for "..data", the link a Kubernetes ConfigMap swaps by rename on an update.
    watch(dir.string(), path.filename().string());
    watch(dir.string(), "..data");
    // Every link on the way, where it is: a link swapped to another target is an edit.
    fs::path at;
    for (const auto& part : path) {
      at /= part;
      std::error_code ec;
      if (fs::is_symlink(at, ec) && at.has_parent_path() && at != path)
        watch(at.parent_path().string(), at.filename().string());
    }
    // The file's final target, when it is a link into another directory.
    std::error_code ec;
    if (fs::is_symlink(path, ec)) {
      auto target = fs::canonical(path, ec);
      if (!ec) watch(target.parent_path().string(), target.filename().string());
    }
  }
}

void PolicyWatch::onReadable() {
  alignas(inotify_event) char buf[16384];
  bool changed = false, rearm = false;
  for (;;) {
    ssize_t n = ::read(fd_, buf, sizeof buf);
    if (n <= 0) break;  // EAGAIN: all read
    for (char* p = buf; p < buf + n;) {
      auto* ev = reinterpret_cast<inotify_event*>(p);
      p += sizeof(inotify_event) + ev->len;
      auto it = dirs_.find(ev->wd);
      if (it == dirs_.end()) continue;  // a watch set before the last arm()
      if (ev->mask & kSelfEvents) {
        // The directory went (a release removed, a ConfigMap's old data): its watch is gone.
        rearm = changed = true;
        continue;
      }
      if (ev->len == 0 || !it->second.names.count(ev->name)) continue;
      if (ev->mask & IN_CREATE) {
        // A file created is being written (its IN_CLOSE_WRITE ends that); a link made is
        // whole at once.
        struct stat st;
        std::string entry = it->second.path + "/" + ev->name;
        if (::lstat(entry.c_str(), &st) != 0 || !S_ISLNK(st.st_mode)) continue;
      }
      changed = true;
    }
  }
  if (!changed) return;
  if (rearm) arm();
  uv_timer_start(
      &debounce_,
      [](uv_timer_t* t) {
        auto* self = static_cast<PolicyWatch*>(t->data);
        self->arm();  // links may point elsewhere now
        self->onChange_();
      },
      kDebounceMs, 0);
}

}  // namespace tollgate
