// HttpParser: llhttp (strict mode) wrapped in a class. llhttp's callbacks trampoline into
// members; the request head is gathered into one arena string that keeps its capacity
// across the messages of a connection; header limits are enforced in the callbacks, and
// the bytes consumed are taken from llhttp's error position when it stops early.
#pragma once

#include <llhttp.h>

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace tollgate {

// One parsed message head. Views stay valid until the next message begins.
class HttpHead {
 public:
  struct Field {
    uint32_t nameOff, nameLen, valueOff, valueLen;
  };

  void clear();
  std::string_view url() const { return view(urlOff_, urlLen_); }     // requests
  std::string_view reason() const { return view(urlOff_, urlLen_); }  // responses
  size_t size() const { return fields_.size(); }
  std::string_view name(size_t i) const { return view(fields_[i].nameOff, fields_[i].nameLen); }
  std::string_view value(size_t i) const { return view(fields_[i].valueOff, fields_[i].valueLen); }
  // First value of a header (case-insensitive name), if present.
  std::optional<std::string_view> find(std::string_view name) const;
  size_t count(std::string_view name) const;

  int method = 0;  // llhttp_method_t, requests only
  int status = 0;  // responses only
  int versionMajor = 1;
  int versionMinor = 1;

 private:
  friend class HttpParser;
  std::string_view view(uint32_t off, uint32_t len) const { return {arena_.data() + off, len}; }
  std::string arena_;
  std::vector<Field> fields_;
  uint32_t urlOff_ = 0, urlLen_ = 0;
  bool fieldOpen_ = false;  // a field has begun and its value is not complete
  bool inValue_ = false;    // its value has begun
};

inline char asciiLower(char c) {
  return (c >= 'A' && c <= 'Z') ? static_cast<char>(c + 32) : c;
}
// ASCII case-insensitive comparison (header names are ASCII; no locale involved). Inline:
// every header lookup calls it for each field, and most differ in length.
inline bool equalsIgnoreCase(std::string_view a, std::string_view b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i) {
    if (asciiLower(a[i]) != asciiLower(b[i])) return false;
  }
  return true;
}

class HttpParser {
 public:
  enum class Type { kRequest, kResponse };
  struct Limits {
    size_t maxHeaderBytes = 32 * 1024;
    size_t maxHeaders = 100;
    size_t maxUriBytes = 8 * 1024;
  };
  class Handler {
   public:
    virtual void onMessageBegin(HttpParser& parser) = 0;
    // Return 0 to go on, 1 for "no body" (responses to HEAD), -1 after fail() to stop.
    virtual int onHeadersComplete(HttpParser& parser) = 0;
    virtual int onBody(HttpParser& parser, std::string_view data) = 0;
    // Return 0, or HPE_PAUSED to stop after this message (pipelining).
    virtual int onMessageComplete(HttpParser& parser) = 0;

   protected:
    ~Handler() = default;
  };

  enum class State { kOk, kPaused, kUpgrade, kError };
  struct Outcome {
    State state = State::kOk;
    size_t consumed = 0;
  };

  HttpParser(Type type, const Limits& limits, Handler& handler);
  HttpParser(const HttpParser&) = delete;
  HttpParser& operator=(const HttpParser&) = delete;

  Outcome execute(std::string_view data);
  // Signals the end of input (for close-delimited bodies). Returns false on a bad end.
  bool finish();
  void resume() { llhttp_resume(&parser_); }
  void resumeAfterUpgrade() { llhttp_resume_after_upgrade(&parser_); }
  void reset();

  // Marks the message bad: the status (400, 413, 414, 431) and reason of the reply.
  void fail(int status, std::string reason);
  int errorStatus() const { return errorStatus_; }
  const std::string& errorReason() const { return errorReason_; }

  const HttpHead& head() const { return head_; }
  bool keepAlive() const { return llhttp_should_keep_alive(&parser_) != 0; }
  bool upgrade() const { return parser_.upgrade != 0; }
  bool chunked() const { return (parser_.flags & F_CHUNKED) != 0; }
  bool hasContentLength() const { return (parser_.flags & F_CONTENT_LENGTH) != 0; }
  uint64_t contentLength() const { return contentLength_; }
  bool messageInProgress() const { return inMessage_; }
  bool headersDone() const { return headersDone_; }

 private:
  static int onMessageBeginCb(llhttp_t* p);
  static int onUrlCb(llhttp_t* p, const char* at, size_t len);
  static int onStatusCb(llhttp_t* p, const char* at, size_t len);
  static int onHeaderFieldCb(llhttp_t* p, const char* at, size_t len);
  static int onHeaderValueCb(llhttp_t* p, const char* at, size_t len);
  static int onHeaderValueCompleteCb(llhttp_t* p);
  static int onHeadersCompleteCb(llhttp_t* p);
  static int onBodyCb(llhttp_t* p, const char* at, size_t len);
  static int onMessageCompleteCb(llhttp_t* p);
  bool addHeaderBytes(size_t len);
  bool isObsFold(const char* at) const;

  llhttp_t parser_;
  Type type_;
  Limits limits_;
  Handler& handler_;
  HttpHead head_;
  size_t headerBytes_ = 0;
  uint64_t contentLength_ = 0;
  int errorStatus_ = 0;
  std::string errorReason_;
  bool inMessage_ = false;
  bool headersDone_ = false;
  // For obs-fold detection: llhttp hands a folded line to on_header_value as more value.
  const char* bufStart_ = nullptr;
  const char* bufEnd_ = nullptr;
  uint64_t executeCount_ = 0;
  uint64_t lastValueExecute_ = 0;
  const char* lastValueEnd_ = nullptr;
  bool lastValueAtBufferEnd_ = false;
  // A fold after an empty value (`X:\r\n b`) reaches on_header_value as the value's first
  // bytes: the line break is found by looking back from them, into the reads before when
  // the open field's name ended there (breakBeforeValue_: a line break came after it).
  bool breakBeforeValue_ = false;
  bool lineBreakBefore(const char* at) const;
};

}  // namespace tollgate
