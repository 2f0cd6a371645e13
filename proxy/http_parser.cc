#include "proxy/http_parser.h"

namespace tollgate {
namespace {

const llhttp_settings_t& settings() {
  static const llhttp_settings_t s = [] {
    llhttp_settings_t v;
    llhttp_settings_init(&v);
    return v;
  }();
  return s;
}

HttpParser& self(llhttp_t* p) {
  return *static_cast<HttpParser*>(p->data);
}

}  // namespace

void HttpHead::clear() {
  arena_.clear();
  fields_.clear();
  urlOff_ = urlLen_ = 0;
  fieldOpen_ = inValue_ = false;
  method = status = 0;
  versionMajor = versionMinor = 1;
}

std::optional<std::string_view> HttpHead::find(std::string_view n) const {
  for (size_t i = 0; i < fields_.size(); ++i) {
    if (equalsIgnoreCase(name(i), n)) return value(i);
  }
  return std::nullopt;
}

size_t HttpHead::count(std::string_view n) const {
  size_t c = 0;
  for (size_t i = 0; i < fields_.size(); ++i) c += equalsIgnoreCase(name(i), n) ? 1 : 0;
  return c;
}

HttpParser::HttpParser(Type type, const Limits& limits, Handler& handler)
    : type_(type), limits_(limits), handler_(handler) {
  reset();
}

void HttpParser::reset() {
  // The settings struct is shared and immutable; the callbacks are installed per parser
  // through a copy so that each instance trampolines into its own members.
  static const llhttp_settings_t callbacks = [] {
    llhttp_settings_t s = settings();
    s.on_message_begin = onMessageBeginCb;
    s.on_url = onUrlCb;
    s.on_status = onStatusCb;
    s.on_header_field = onHeaderFieldCb;
    s.on_header_value = onHeaderValueCb;
    s.on_header_value_complete = onHeaderValueCompleteCb;
    s.on_headers_complete = onHeadersCompleteCb;
    s.on_body = onBodyCb;
    s.on_message_complete = onMessageCompleteCb;
    return s;
  }();
  llhttp_init(&parser_, type_ == Type::kRequest ? HTTP_REQUEST : HTTP_RESPONSE, &callbacks);
  parser_.data = this;
  head_.clear();
  errorStatus_ = 0;
  errorReason_.clear();
  inMessage_ = headersDone_ = false;
}

void HttpParser::fail(int status, std::string reason) {
  if (errorStatus_ == 0) {
    errorStatus_ = status;
    errorReason_ = std::move(reason);
  }
}

HttpParser::Outcome HttpParser::execute(std::string_view data) {
  Outcome out;
  ++executeCount_;
  bufStart_ = data.data();
  bufEnd_ = data.data() + data.size();
  llhttp_errno_t err = llhttp_execute(&parser_, data.data(), data.size());
  switch (err) {
    case HPE_OK:
      out.consumed = data.size();
      // A read that ends between a field's name and its value: whether a line break came
      // after the name, for the value's first bytes in a later read.
      if (head_.fieldOpen_ && !head_.inValue_) breakBeforeValue_ = lineBreakBefore(bufEnd_);
      return out;
    case HPE_PAUSED:
      out.state = State::kPaused;
      break;
    case HPE_PAUSED_UPGRADE:
      out.state = State::kUpgrade;
      break;
    default:
      out.state = State::kError;
      if (errorStatus_ == 0)
        fail(400, llhttp_get_error_reason(&parser_) ? llhttp_get_error_reason(&parser_)
                                                    : llhttp_errno_name(err));
      break;
  }
  const char* pos = llhttp_get_error_pos(&parser_);
  out.consumed = pos ? static_cast<size_t>(pos - data.data()) : data.size();
  if (out.consumed > data.size()) out.consumed = data.size();
  return out;
}

bool HttpParser::finish() {
  return llhttp_finish(&parser_) == HPE_OK;
}

bool HttpParser::addHeaderBytes(size_t len) {
  headerBytes_ += len;
  if (headerBytes_ > limits_.maxHeaderBytes) {
    fail(431, std::string(type_ == Type::kRequest ? "request" : "response") +
                  " header fields larger than " + std::to_string(limits_.maxHeaderBytes) +
                  " bytes");
    return false;
  }
  return true;
}

int HttpParser::onMessageBeginCb(llhttp_t* p) {
  auto& s = self(p);
  s.head_.clear();
  s.headerBytes_ = 0;
  s.contentLength_ = 0;
  s.inMessage_ = true;
  s.headersDone_ = false;
  s.handler_.onMessageBegin(s);
  return 0;
}

int HttpParser::onUrlCb(llhttp_t* p, const char* at, size_t len) {
  auto& s = self(p);
  if (s.head_.urlLen_ + len > s.limits_.maxUriBytes) {
    s.fail(414, "request target longer than " + std::to_string(s.limits_.maxUriBytes) + " bytes");
    return -1;
  }
  if (!s.addHeaderBytes(len)) return -1;
  if (s.head_.urlLen_ == 0) s.head_.urlOff_ = static_cast<uint32_t>(s.head_.arena_.size());
  s.head_.arena_.append(at, len);
  s.head_.urlLen_ += static_cast<uint32_t>(len);
  return 0;
}

int HttpParser::onStatusCb(llhttp_t* p, const char* at, size_t len) {
  auto& s = self(p);
  if (!s.addHeaderBytes(len)) return -1;
  // A response's reason phrase, kept where a request keeps its target.
  if (s.head_.urlLen_ == 0) s.head_.urlOff_ = static_cast<uint32_t>(s.head_.arena_.size());
  s.head_.arena_.append(at, len);
  s.head_.urlLen_ += static_cast<uint32_t>(len);
  return 0;
}

int HttpParser::onHeaderFieldCb(llhttp_t* p, const char* at, size_t len) {
  auto& s = self(p);
  if (!s.addHeaderBytes(len)) return -1;
  auto& h = s.head_;
  if (!h.fieldOpen_) {
    if (h.fields_.size() >= s.limits_.maxHeaders) {
      s.fail(431, "more than " + std::to_string(s.limits_.maxHeaders) + " header fields");
      return -1;
    }
    auto off = static_cast<uint32_t>(h.arena_.size());
    h.fields_.push_back({off, 0, off, 0});
    h.fieldOpen_ = true;
    h.inValue_ = false;
    s.breakBeforeValue_ = false;
  }
  h.arena_.append(at, len);
  h.fields_.back().nameLen += static_cast<uint32_t>(len);
  h.fields_.back().valueOff = static_cast<uint32_t>(h.arena_.size());
  return 0;
}

// A value that goes on in a second callback is legitimate only when the first one ended
// where its input ended (the value was split across reads); anything else skipped a line
// break, i.e. the value was folded onto a new line (obs-fold, RFC 9112 §5.2).
bool HttpParser::isObsFold(const char* at) const {
  if (lastValueExecute_ == executeCount_) return at != lastValueEnd_;
  return !(lastValueAtBufferEnd_ && at == bufStart_);
}

bool HttpParser::lineBreakBefore(const char* at) const {
  // Back over the whitespace before `at` to the colon: a LF among it is a line break.
  for (const char* c = at; c > bufStart_; --c) {
    char b = c[-1];
    if (b == '\n') return true;
    if (b != ' ' && b != '\t' && b != '\r') return false;
  }
  return breakBeforeValue_;  // all whitespace back to the read's start: the reads before
}

int HttpParser::onHeaderValueCb(llhttp_t* p, const char* at, size_t len) {
  auto& s = self(p);
  if (!s.addHeaderBytes(len)) return -1;
  auto& h = s.head_;
  if (!h.fieldOpen_) return -1;
  if (len == 0) return 0;  // an empty value's span, closed by the next line's first byte
  if (h.inValue_ ? s.isObsFold(at) : s.lineBreakBefore(at)) {
    s.fail(400, "obsolete line folding in a header value");
    return -1;
  }
  s.lastValueExecute_ = s.executeCount_;
  s.lastValueEnd_ = at + len;
  s.lastValueAtBufferEnd_ = at + len == s.bufEnd_;
  h.inValue_ = true;
  h.arena_.append(at, len);
  h.fields_.back().valueLen += static_cast<uint32_t>(len);
  return 0;
}

int HttpParser::onHeaderValueCompleteCb(llhttp_t* p) {
  auto& h = self(p).head_;
  h.fieldOpen_ = false;
  h.inValue_ = false;
  return 0;
}

int HttpParser::onHeadersCompleteCb(llhttp_t* p) {
  auto& s = self(p);
  auto& h = s.head_;
  h.method = p->method;
  h.status = p->status_code;
  h.versionMajor = p->http_major;
  h.versionMinor = p->http_minor;
  h.fieldOpen_ = false;
  s.contentLength_ = (p->flags & F_CONTENT_LENGTH) ? p->content_length : 0;
  s.headersDone_ = true;
  return s.handler_.onHeadersComplete(s);
}

int HttpParser::onBodyCb(llhttp_t* p, const char* at, size_t len) {
  auto& s = self(p);
  return s.handler_.onBody(s, std::string_view(at, len));
}

int HttpParser::onMessageCompleteCb(llhttp_t* p) {
  auto& s = self(p);
  s.inMessage_ = false;
  return s.handler_.onMessageComplete(s);
}

}  // namespace tollgate
