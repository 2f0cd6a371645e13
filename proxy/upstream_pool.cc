#include "proxy/upstream_pool.h"

#include <algorithm>

namespace tollgate {

UpstreamPool::UpstreamPool(uv_loop_t* loop, std::chrono::milliseconds idleTimeout,
                           size_t maxIdlePerKey)
    : loop_(loop), idleTimeout_(idleTimeout), maxIdlePerKey_(maxIdlePerKey) {
  sweeper_ = Timer::create(loop_, [this] { sweep(); });
}

UpstreamPool::~UpstreamPool() {
  closeAll();
}

StreamPtr UpstreamPool::take(const std::string& key) {
  auto it = idle_.find(key);
  if (it == idle_.end() || it->second.empty()) return nullptr;
  // Most recently used first: it is the least likely to have been closed by the upstream.
  StreamPtr stream = std::move(it->second.back().stream);
  it->second.pop_back();
  if (it->second.empty()) idle_.erase(it);  // keys come and go: the map keeps none empty
  keys_.erase(stream.get());
  // It stays reading: the new owner takes over as its handler, with no epoll change.
  stream->setHandler(nullptr);
  return stream;
}

void UpstreamPool::put(const std::string& key, StreamPtr stream) {
  if (auto it = idle_.find(key);
      maxIdlePerKey_ == 0 || (it != idle_.end() && it->second.size() >= maxIdlePerKey_))
    return;  // the StreamPtr closes it
  stream->setHandler(this);
  if (stream->readStart() != 0) return;
  keys_[stream.get()] = key;
  idle_[key].push_back({std::move(stream), uv_now(loop_)});
  if (keys_.size() == 1)
    sweeper_->start(static_cast<uint64_t>(std::min<int64_t>(idleTimeout_.count(), 1000)));
}

void UpstreamPool::drop(const std::string& key) {
  auto it = idle_.find(key);
  if (it == idle_.end()) return;
  for (auto& i : it->second) keys_.erase(i.stream.get());
  idle_.erase(it);  // the StreamPtrs close them
}

void UpstreamPool::remove(TcpStream& stream) {
  auto k = keys_.find(&stream);
  if (k == keys_.end()) return;
  auto it = idle_.find(k->second);
  keys_.erase(k);
  if (it == idle_.end()) return;
  auto& list = it->second;
  list.erase(std::remove_if(list.begin(), list.end(),
                            [&](const Idle& i) { return i.stream.get() == &stream; }),
             list.end());
  if (list.empty()) idle_.erase(it);
}

void UpstreamPool::sweep() {
  uint64_t now = uv_now(loop_);
  auto limit = static_cast<uint64_t>(idleTimeout_.count());
  for (auto it = idle_.begin(); it != idle_.end();) {
    auto& list = it->second;
    list.erase(std::remove_if(list.begin(), list.end(),
                              [&](Idle& i) {
                                if (now - i.sinceMs < limit) return false;
                                keys_.erase(i.stream.get());
                                return true;
                              }),
               list.end());
    it = list.empty() ? idle_.erase(it) : std::next(it);
  }
  if (!keys_.empty())
    sweeper_->start(static_cast<uint64_t>(std::min<int64_t>(idleTimeout_.count(), 1000)));
}

void UpstreamPool::closeAll() {
  keys_.clear();
  idle_.clear();
  sweeper_.reset();
}

size_t UpstreamPool::idleCount() const {
  return keys_.size();
}

}  // namespace tollgate
