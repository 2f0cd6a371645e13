#include "common/log.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <ctime>
#include <mutex>

namespace tollgate {
namespace {

std::atomic<int> gLevel{static_cast<int>(LogLevel::kInfo)};
std::mutex gWriteMutex;
thread_local bool tBuffered = false;
thread_local std::string tBuffer;
constexpr size_t kFlushBytes = 32 * 1024;

const char* levelName(LogLevel level) {
  switch (level) {
    case LogLevel::kDebug:
      return "debug";
    case LogLevel::kInfo:
      return "info";
    case LogLevel::kWarn:
      return "warn";
    case LogLevel::kError:
      return "error";
  }
  return "info";
}

void writeAll(std::string_view data) {
  std::lock_guard<std::mutex> lock(gWriteMutex);
  while (!data.empty()) {
    ssize_t n = ::write(STDERR_FILENO, data.data(), data.size());
    if (n < 0) {
      if (errno == EINTR) continue;
      return;  // stderr is gone; logging must never stop the proxy
    }
    data.remove_prefix(static_cast<size_t>(n));
  }
}

void appendTimestamp(std::string& out) {
  auto now = std::chrono::system_clock::now();
  auto secs = std::chrono::system_clock::to_time_t(now);
  auto micros =
      std::chrono::duration_cast<std::chrono::microseconds>(now.time_since_epoch()).count() %
      1000000;
  std::tm tm{};
  gmtime_r(&secs, &tm);
  char buf[40];
  size_t n = std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%S", &tm);
  n += static_cast<size_t>(
      std::snprintf(buf + n, sizeof buf - n, ".%06ldZ", static_cast<long>(micros)));
  out.append(buf, n);
}

}  // namespace

void Log::setLevel(LogLevel level) {
  gLevel.store(static_cast<int>(level));
}

bool Log::enabled(LogLevel level) {
  return static_cast<int>(level) >= gLevel.load(std::memory_order_relaxed);
}

bool Log::parseLevel(std::string_view text, LogLevel& out) {
  for (auto level : {LogLevel::kDebug, LogLevel::kInfo, LogLevel::kWarn, LogLevel::kError}) {
    if (text == levelName(level)) {
      out = level;
      return true;
    }
  }
  return false;
}

Log::Line::Line(LogLevel level, std::string_view msg) : level_(level), obj_(text_) {
  std::string ts;
  appendTimestamp(ts);
  obj_.add("ts", ts).add("level", levelName(level)).add("msg", msg);
}

void Log::Line::emit() {
  obj_.close();
  text_ += '\n';
  write(level_, text_);
}

void Log::setThreadBuffered(bool buffered) {
  if (!buffered) flushThread();
  tBuffered = buffered;
}

void Log::flushThread() {
  if (tBuffer.empty()) return;
  writeAll(tBuffer);
  tBuffer.clear();
}

void Log::write(LogLevel level, std::string_view line) {
  if (!tBuffered || level >= LogLevel::kWarn) {
    flushThread();
    writeAll(line);
    return;
  }
  tBuffer += line;
  if (tBuffer.size() >= kFlushBytes) flushThread();
}

}  // namespace tollgate
