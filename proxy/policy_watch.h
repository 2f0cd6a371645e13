// PolicyWatch: reloads the policies when an edit of their files is finished, through inotify
// on the directories they are in. An edit counts once it is whole: a file closed after
// writing, one renamed or linked into place, one deleted (the reload then fails and the last
// good set stays). A write still going on (a slow `cat > policy.yaml`, scp) is not read
// half-way: a prefix of a policy can parse and say less than the whole (its later halts).
// Directories reached through links are watched where the links are too (a `current ->
// releases/N` layout, a ConfigMap's `..data`), and every watch is set again after a change,
// since a link may point elsewhere since.
#pragma once

#include <uv.h>

#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

namespace tollgate {

class PolicyWatch {
 public:
  PolicyWatch(uv_loop_t* loop, std::vector<std::string> files, std::function<void()> onChange);
  PolicyWatch(const PolicyWatch&) = delete;
  PolicyWatch& operator=(const PolicyWatch&) = delete;
  ~PolicyWatch();

  // False (with a warning logged) when inotify is unavailable: edits are then not seen.
  bool start();
  // Closes the loop's handles; the object must outlive the loop's next turn.
  void close();

  static constexpr uint64_t kDebounceMs = 200;  // several events arrive for one save

 private:
  void arm();  // (re)sets the watches, from the links as they are now
  void watch(const std::string& dir, const std::string& name);
  void onReadable();

  uv_loop_t* loop_;
  std::vector<std::string> files_;
  std::function<void()> onChange_;
  int fd_ = -1;
  uv_poll_t poll_;
  uv_timer_t debounce_;
  bool started_ = false, closed_ = false;
  struct Dir {
    std::string path;
    std::set<std::string> names;  // the entries of the directory that count
  };
  std::map<int, Dir> dirs_;  // by watch
};

}  // namespace tollgate
