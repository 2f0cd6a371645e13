// JSON-lines logging on stderr. Worker threads buffer info/debug lines and flush them on a
// timer (a syscall per request would cost more than the request); warnings and errors are
// written at once.
#pragma once

#include <string>
#include <string_view>

#include "common/json.h"

namespace tollgate {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

class Log {
 public:
  static void setLevel(LogLevel level);
  static bool enabled(LogLevel level);
  static bool parseLevel(std::string_view text, LogLevel& out);

  // Starts a line: {"ts":"…","level":"…","msg":"…" — the caller adds fields with the
  // returned object, then calls emit().
  class Line {
   public:
    Line(LogLevel level, std::string_view msg);
    JsonObject& fields() { return obj_; }
    template <class T>
    Line& add(std::string_view key, const T& value) {
      obj_.add(key, value);
      return *this;
    }
    void emit();

   private:
    LogLevel level_;
    std::string text_;
    JsonObject obj_;
  };

  // Per-thread buffering: on for worker threads, which call flushThread() periodically.
  static void setThreadBuffered(bool buffered);
  static void flushThread();

 private:
  static void write(LogLevel level, std::string_view line);
};

}  // namespace tollgate
