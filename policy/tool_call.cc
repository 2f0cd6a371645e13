#include "policy/tool_call.h"

#include "common/json.h"
#include "common/sha256.h"
#include "common/units.h"

#include <arpa/inet.h>

#include <algorithm>
#include <cctype>
#include <cstring>
#include <set>

namespace tollgate {
namespace {

bool isUnreserved(unsigned char c) {
  return std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~';
}

// One part of an inet_aton-style IPv4 address: decimal, 0-prefixed octal or 0x hex.
std::optional<uint64_t> ipv4Part(std::string_view p) {
  if (p.empty()) return std::nullopt;
  int base = 10;
  if (p.size() > 1 && p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
    base = 16;
    p.remove_prefix(2);
    if (p.empty()) return uint64_t{0};
  } else if (p.size() > 1 && p[0] == '0') {
    base = 8;
    p.remove_prefix(1);
  }
  uint64_t v = 0;
  for (char c : p) {
    int d = hexValue(c);
    if (d < 0 || d >= base) return std::nullopt;
    v = v * static_cast<uint64_t>(base) + static_cast<uint64_t>(d);
    if (v > 0xFFFFFFFFull) return std::nullopt;
  }
  return v;
}

// "a.b.c.d" with four decimal parts from 0 to 255 and no leading zeros.
bool isCanonicalDottedQuad(std::string_view h) {
  int parts = 0;
  size_t i = 0;
  while (i <= h.size()) {
    size_t start = i;
    int value = 0;
    while (i < h.size() && h[i] >= '0' && h[i] <= '9' && i - start < 4)
      value = value * 10 + (h[i++] - '0');
    size_t len = i - start;
    if (len == 0 || len > 3 || value > 255 || (len > 1 && h[start] == '0')) return false;
    ++parts;
    if (i == h.size()) break;
    if (h[i] != '.') return false;
    ++i;
  }
  return parts == 4;
}

// Every spelling that inet_aton (and so many HTTP clients) accepts as an IPv4 address.
std::optional<uint32_t> parseIpv4Loose(std::string_view host) {
  std::vector<uint64_t> parts;
  size_t start = 0;
  while (true) {
    auto dot = host.find('.', start);
    auto part = ipv4Part(
        host.substr(start, dot == std::string_view::npos ? std::string_view::npos : dot - start));
    if (!part) return std::nullopt;
    parts.push_back(*part);
    if (dot == std::string_view::npos) break;
    start = dot + 1;
    if (parts.size() == 4) return std::nullopt;
  }
  uint64_t v = 0;
  switch (parts.size()) {
    case 1:
      v = parts[0];
      break;
    case 2:
      if (parts[0] > 0xFF || parts[1] > 0xFFFFFF) return std::nullopt;
      v = parts[0] << 24 | parts[1];
      break;
    case 3:
      if (parts[0] > 0xFF || parts[1] > 0xFF || parts[2] > 0xFFFF) return std::nullopt;
      v = parts[0] << 24 | parts[1] << 16 | parts[2];
      break;
    case 4:
      for (auto p : parts) {
        if (p > 0xFF) return std::nullopt;
      }
      v = parts[0] << 24 | parts[1] << 16 | parts[2] << 8 | parts[3];
      break;
    default:
      return std::nullopt;
  }
  return static_cast<uint32_t>(v);
}

ActionClass classOfMethod(std::string_view method) {
  if (method == "GET" || method == "HEAD" || method == "OPTIONS" || method == "CONNECT")
    return ActionClass::kRead;
  if (method == "DELETE") return ActionClass::kDelete;
  return ActionClass::kWrite;
}

// Depth of a JSON text, counted without building it, so a deep body is refused cheaply.
int jsonDepth(std::string_view text) {
  int depth = 0, maxDepth = 0;
  bool inString = false, escape = false;
  for (char c : text) {
    if (inString) {
      if (escape)
        escape = false;
      else if (c == '\\')
        escape = true;
      else if (c == '"')
        inString = false;
      continue;
    }
    if (c == '"')
      inString = true;
    else if (c == '{' || c == '[')
      maxDepth = std::max(maxDepth, ++depth);
    else if (c == '}' || c == ']')
      --depth;
  }
  return maxDepth;
}

// Duplicate keys are read differently by different parsers (first or last wins): a body
// that has them is ambiguous, so it is refused. SAX events, a key set per open object.
class DuplicateKeys : public nlohmann::json_sax<nlohmann::json> {
 public:
  bool found = false;
  size_t count = 0;  // keys in all objects
  bool null() override { return true; }
  bool boolean(bool) override { return true; }
  bool number_integer(number_integer_t) override { return true; }
  bool number_unsigned(number_unsigned_t) override { return true; }
  bool number_float(number_float_t, const string_t&) override { return true; }
  bool string(string_t&) override { return true; }
  bool binary(binary_t&) override { return true; }
  bool start_object(std::size_t) override {
    keys_.emplace_back();
    return true;
  }
  bool key(string_t& k) override {
    if (!keys_.back().insert(k).second) {
      found = true;
      return false;
    }
    ++count;
    return true;
  }
  bool end_object() override {
    keys_.pop_back();
    return true;
  }
  bool start_array(std::size_t) override { return true; }
  bool end_array() override { return true; }
  bool parse_error(std::size_t, const std::string&, const nlohmann::detail::exception&) override {
    return false;
  }

 private:
  std::vector<std::set<std::string>> keys_;
};

// Counts the keys of a JSON text; returns false when one object repeats a key.
bool countKeys(std::string_view text, size_t& keys) {
  DuplicateKeys sax;
  nlohmann::json::sax_parse(text.begin(), text.end(), &sax);
  keys = sax.count;
  return !sax.found;
}

bool looksLikeJson(std::string_view body) {
  if (body.starts_with("\xEF\xBB\xBF")) body.remove_prefix(3);  // a UTF-8 byte order mark
  auto first = body.find_first_not_of(" \t\r\n");
  return first != std::string_view::npos && (body[first] == '{' || body[first] == '[');
}

}  // namespace

bool pathGlobMatch(std::string_view pattern, std::string_view path);  // policy_set.cc

std::string ToolCall::fingerprint() const {
  // The whole call as the human saw it, its body included as read (every tools/call of a
  // batch, a form body): a call with another body must not ride on the approval.
  std::string canon = agent_ + '\n' + scheme_ + '\n' + host_ + ':' + std::to_string(port_) + '\n' +
                      method_ + '\n' + path_ + '?' + query_ + '\n' + tool_ + '\n' + bodyDigest_;
  return sha256Hex(canon, 16);
}

namespace {

// Whether tool t's host, methods and paths fit the request (its MCP names aside).
bool fitsRequest(const ToolDef& t, const std::string& host, const std::string& method,
                 const std::string& path) {
  return std::any_of(t.hosts.begin(), t.hosts.end(),
                     [&](const std::string& h) { return hostMatch(h, host); }) &&
         (t.methods.empty() ||
          std::find(t.methods.begin(), t.methods.end(), method) != t.methods.end()) &&
         (t.paths.empty() || std::any_of(t.paths.begin(), t.paths.end(), [&](const std::string& p) {
            return pathGlobMatch(p, path);
          }));
}

bool namesMcpTool(const ToolDef& t, std::string_view name) {
  return std::any_of(t.mcpTools.begin(), t.mcpTools.end(),
                     [&](const std::string& g) { return globMatch(g, name); });
}

}  // namespace

const ToolDef* mcpToolOf(const PolicySet& /*set*/, const ToolCall& call, std::string_view name) {
  for (const ToolDef* t : call.mcpFits()) {
    if (namesMcpTool(*t, name)) return t;
  }
  return nullptr;
}

const nlohmann::json* jsonAt(const nlohmann::json& doc, std::string_view path) {
  const nlohmann::json* node = &doc;
  for (size_t start = 0;;) {
    auto dot = path.find('.', start);
    if (!node->is_object()) return nullptr;
    auto it = node->find(path.substr(start, dot == std::string_view::npos ? dot : dot - start));
    if (it == node->end()) return nullptr;
    node = &*it;
    if (dot == std::string_view::npos) return node;
    start = dot + 1;
  }
}

Result<std::string> Extractor::canonicalHost(std::string_view host) {
  std::string h(host);
  for (auto& c : h) {
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c + 32);
  }
  if (!h.empty() && h.back() == '.') h.pop_back();
  if (h.empty()) return Error{-1, "empty host"};
  if (h.find(':') != std::string::npos) {
    in6_addr a6;
    if (inet_pton(AF_INET6, h.c_str(), &a6) != 1) return Error{-1, "invalid IPv6 address " + h};
    char buf[INET6_ADDRSTRLEN];
    // An IPv4-mapped address (::ffff:a.b.c.d) is the IPv4 host it maps, and so is one of
    // NAT64's well-known prefix (64:ff9b::a.b.c.d, RFC 6052): a NAT64 gateway delivers it
    // to a.b.c.d.
    if (embedsIpv4(a6.s6_addr)) {
      inet_ntop(AF_INET, &a6.s6_addr[12], buf, sizeof buf);
      return std::string(buf);
    }
    inet_ntop(AF_INET6, &a6, buf, sizeof buf);
    return std::string(buf);
  }
  bool numeric =
      std::all_of(h.begin(), h.end(),
                  [](unsigned char c) { return std::isxdigit(c) || c == '.' || c == 'x'; }) &&
      std::isdigit(static_cast<unsigned char>(h[0]));
  if (numeric) {
    if (isCanonicalDottedQuad(h)) return h;  // the common case, without formatting it again
    auto v4 = parseIpv4Loose(h);
    if (!v4) return Error{-1, "invalid IPv4 address " + h};
    char buf[INET_ADDRSTRLEN];
    in_addr a{htonl(*v4)};
    inet_ntop(AF_INET, &a, buf, sizeof buf);
    return std::string(buf);
  }
  for (unsigned char c : h) {
    if (!(std::isalnum(c) || c == '-' || c == '.' || c == '_'))
      return Error{-1, "invalid character in host " + h};
  }
  return h;
}

Result<std::string> Extractor::normalisePath(std::string_view raw) {
  if (raw.empty()) return std::string("/");
  if (raw[0] != '/') return Error{-1, "path does not start with /"};
  // Decode: unreserved escapes become their character; the others stay encoded (upper
  // case), except those that would change the path's structure, which are refused.
  std::string decoded;
  decoded.reserve(raw.size());
  for (size_t i = 0; i < raw.size(); ++i) {
    char c = raw[i];
    if (c == '\\') return Error{-1, "backslash in path"};
    if (c != '%') {
      decoded += c;
      continue;
    }
    if (i + 2 >= raw.size() || hexValue(raw[i + 1]) < 0 || hexValue(raw[i + 2]) < 0) {
      return Error{-1, "invalid percent-escape in path"};
    }
    auto v = static_cast<unsigned char>(hexValue(raw[i + 1]) * 16 + hexValue(raw[i + 2]));
    i += 2;
    if (v == 0) return Error{-1, "encoded NUL in path"};
    if (v == '/' || v == '\\') return Error{-1, "encoded slash or backslash in path"};
    if (isUnreserved(v) || v >= 0x80) {
      decoded += static_cast<char>(v);
    } else {
      static constexpr char kHex[] = "0123456789ABCDEF";
      decoded += '%';
      decoded += kHex[v >> 4];
      decoded += kHex[v & 0xF];
    }
  }
  if (firstInvalidUtf8(decoded) != std::string_view::npos)
    return Error{-1, "invalid UTF-8 in path"};
  // Segments: drop empty ones (duplicate slashes) and ".", resolve "..".
  std::vector<std::string_view> segments;
  std::string_view rest(decoded);
  bool trailingSlash = decoded.size() > 1 && decoded.back() == '/';
  while (!rest.empty()) {
    auto slash = rest.find('/');
    auto seg = rest.substr(0, slash);
    // "..;x" is ".." to some servers (path parameters): ambiguous, so refused.
    if (seg.starts_with("..;") || seg.starts_with(".;"))
      return Error{-1, "path parameter on a dot segment"};
    if (seg == "..") {
      if (!segments.empty()) segments.pop_back();
    } else if (!seg.empty() && seg != ".") {
      segments.push_back(seg);
    }
    if (slash == std::string_view::npos) break;
    rest.remove_prefix(slash + 1);
  }
  std::string out;
  for (auto seg : segments) {
    out += '/';
    out += seg;
  }
  if (out.empty() || (trailingSlash && !segments.empty())) out += '/';
  return out;
}

std::string Extractor::withoutPathParameters(std::string_view path) {
  if (path.find(';') == std::string_view::npos) return std::string(path);
  std::string out;
  bool trailingSlash = path.size() > 1 && path.back() == '/';
  while (!path.empty()) {
    path.remove_prefix(1);  // the '/'
    auto slash = path.find('/');
    auto seg = path.substr(0, slash);
    seg = seg.substr(0, seg.find(';'));
    if (!seg.empty()) {
      out += '/';
      out += seg;
    }
    if (slash == std::string_view::npos) break;
    path.remove_prefix(slash);
  }
  if (out.empty() || trailingSlash) out += '/';
  return out;
}

Result<ToolCall> Extractor::extract(const CallInfo& call, const PolicySet& set) {
  ToolCall tc;
  tc.agent_ = call.agent.empty() ? "anonymous" : std::string(call.agent);
  tc.scheme_ = std::string(call.scheme);
  tc.method_ = std::string(call.method);
  tc.port_ = call.port;
  auto host = canonicalHost(call.host);
  if (!host) return host.error();
  tc.host_ = std::move(host.value());
  if (call.scheme != "tunnel") {
    auto target = call.target;
    auto q = target.find('?');
    auto path = normalisePath(target.substr(0, q));
    if (!path) return path.error();
    tc.path_ = withoutPathParameters(path.value());
    if (q != std::string_view::npos) tc.query_ = std::string(target.substr(q + 1));
  }
  tc.actionClass_ = classOfMethod(tc.method_);

  // The body: JSON params and MCP JSON-RPC, within the set's bounds.
  nlohmann::json body(nlohmann::json::value_t::discarded);
  // A body larger than the limit is refused even when none of it was kept (its first read
  // was already over the limit): deciding it as bodiless would skip every params rule.
  if (call.bodyAvailable && call.bodyTruncated)
    return Error{-1, "request body larger than the policy's max_body_bytes"};
  if (call.bodyAvailable && !call.body.empty()) {
    tc.bodyDigest_ = call.bodySha256.empty() ? sha256Hex(call.body) : std::string(call.bodySha256);
    // Media types are case-insensitive (RFC 9110, 8.3.1): Application/JSON is JSON.
    std::string ct(call.contentType);
    for (auto& c : ct) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    // A body that looks like JSON is read as JSON whatever its media type says (or without
    // one): many servers parse it anyway (Express's json({type: '*/*'}), Flask's
    // get_json(force=True)), and text/plain must not carry params past a halt's conditions.
    // It must then be valid JSON, as under a JSON type: what a lenient server reads
    // (NaN, comments) the policy cannot.
    bool json = ct.find("json") != std::string::npos || looksLikeJson(call.body);
    if (json) {
      if (jsonDepth(call.body) > set.maxJsonDepth())
        return Error{-1, "JSON body nested deeper than max_json_depth"};
      size_t keys = 0;
      if (!countKeys(call.body, keys)) return Error{-1, "JSON body with a duplicate key"};
      if (keys > set.maxJsonKeys()) return Error{-1, "JSON body with more keys than max_json_keys"};
      auto parsed = nlohmann::json::parse(call.body.begin(), call.body.end(), nullptr, false);
      if (parsed.is_discarded()) return Error{-1, "invalid JSON body"};
      // MCP: JSON-RPC 2.0, a single call or a batch. A tool's name is an identifier: one
      // longer than kMaxMcpName is refused (it goes into the call's audit record, its tool and
      // its reason, and a name of the body's size made records of ~130 KiB each).
      constexpr size_t kMaxMcpName = 256;
      bool nameTooLong = false;
      auto visit = [&](const nlohmann::json& msg) {
        if (!msg.is_object() || !msg.contains("jsonrpc") || !msg.contains("method") ||
            !msg["method"].is_string())
          return;
        tc.mcpMethod_ = msg["method"].get<std::string>();
        if (tc.mcpMethod_ == "tools/call" && msg.contains("params") && msg["params"].is_object()) {
          const auto& p = msg["params"];
          if (p.contains("name") && p["name"].is_string()) {
            if (p["name"].get_ref<const std::string&>().size() > kMaxMcpName) {
              nameTooLong = true;
              return;
            }
            tc.mcpTools_.push_back(p["name"].get<std::string>());
            tc.mcpArguments_.push_back(p.contains("arguments") ? p["arguments"] : nlohmann::json());
          }
        }
      };
      if (parsed.is_array()) {
        for (const auto& m : parsed) visit(m);
      } else {
        visit(parsed);
      }
      if (nameTooLong)
        return Error{-1, "MCP tool name longer than " + std::to_string(kMaxMcpName) + " bytes"};
      body = std::move(parsed);
    }
  }

  // Attribution: the first tool whose match fits. An MCP batch is attributed to each of its
  // tools in turn by the engine; here the first one names the call.
  if (!tc.mcpTools_.empty()) {
    for (const auto& t : set.tools()) {
      if (!t.mcpTools.empty() && fitsRequest(t, tc.host_, tc.method_, tc.path_))
        tc.mcpFits_.push_back(&t);
    }
  }
  for (const auto& t : set.tools()) {
    if (!t.mcpTools.empty()) {
      if (tc.mcpTools_.empty() ||
          std::find(tc.mcpFits_.begin(), tc.mcpFits_.end(), &t) == tc.mcpFits_.end())
        continue;
      bool all = std::all_of(tc.mcpTools_.begin(), tc.mcpTools_.end(),
                             [&](const std::string& name) { return namesMcpTool(t, name); });
      if (!all) continue;  // a batch that hides another tool is not this tool
    } else if (!fitsRequest(t, tc.host_, tc.method_, tc.path_)) {
      continue;
    }
    tc.toolDef_ = &t;
    tc.tool_ = t.name;
    tc.actionClass_ = t.actionClass;
    break;
  }
  if (!tc.toolDef_) tc.tool_ = "host:" + tc.host_;
  // params: the JSON body's own fields; for the MCP tool of its calls, the arguments of its
  // one tools/call (a batch's are in mcpArguments(), each checked on its own by the engine).
  // A JSON-RPC-shaped body sent to another tool is that tool's body. A JSON-RPC message
  // that calls no tool (initialize, tools/list) has no params.
  bool ownFields =
      tc.mcpTools_.empty() ? tc.mcpMethod_.empty() : tc.attributedIsSubject() && tc.toolDef_;
  if (!body.is_discarded() && ownFields)
    tc.params_ = std::move(body);
  else if (tc.mcpArguments_.size() == 1)
    tc.params_ = tc.mcpArguments_[0];
  return tc;
}

}  // namespace tollgate
