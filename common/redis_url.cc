#include "common/redis_url.h"

#include <cctype>

namespace tollgate {

Result<RedisUrl> parseRedisUrl(std::string_view url) {
  // Not echoed in errors: the URL may hold a password.
  std::string_view rest = url;
  bool scheme = rest.starts_with("redis://");
  if (scheme) rest.remove_prefix(8);
  while (!rest.empty() && rest.back() == '/') rest.remove_suffix(1);
  RedisUrl out;
  if (auto at = rest.rfind('@'); at != std::string_view::npos) {
    auto userinfo = rest.substr(0, at);
    rest.remove_prefix(at + 1);
    auto colon = userinfo.find(':');
    auto decode = [](std::string_view in, std::string& to) {
      for (size_t i = 0; i < in.size(); ++i) {
        if (in[i] != '%') {
          to += in[i];
          continue;
        }
        int hi = i + 2 < in.size() ? hexValue(in[i + 1]) : -1;
        int lo = i + 2 < in.size() ? hexValue(in[i + 2]) : -1;
        if (hi < 0 || lo < 0) return false;
        to += static_cast<char>(hi * 16 + lo);
        i += 2;
      }
      return true;
    };
    if (!scheme || colon == std::string_view::npos ||
        !decode(userinfo.substr(0, colon), out.auth.user) ||
        !decode(userinfo.substr(colon + 1), out.auth.password) || out.auth.password.empty()) {
      return Error{-1,
                   "redis url: credentials go as redis://[USER]:PASSWORD@HOST:PORT "
                   "(percent-encoded)"};
    }
  }
  if (rest.empty() || rest.find_first_of("/@") != std::string_view::npos)
    return Error{-1,
                 "redis url: expected redis://[[USER]:PASSWORD@]HOST:PORT (databases are not "
                 "supported)"};
  if (auto hp = parseHostPort(rest)) {
    out.address = *hp;
  } else if (rest.find_first_of(":[]") == std::string_view::npos) {
    out.address = HostPort{std::string(rest), 6379};
  } else if (rest.size() > 2 && rest.front() == '[' && rest.back() == ']' &&
             rest.find(']') == rest.size() - 1) {
    out.address = HostPort{std::string(rest.substr(1, rest.size() - 2)), 6379};  // [::1]
  } else {
    return Error{-1, "redis url '" + std::string(rest) + "': bad host or port"};
  }
  return out;
}

Result<std::pair<std::vector<HostPort>, RedisAuth>> parseRedisUrls(
    const std::vector<std::string>& urls) {
  std::pair<std::vector<HostPort>, RedisAuth> out;
  for (size_t i = 0; i < urls.size(); ++i) {
    auto u = parseRedisUrl(urls[i]);
    if (!u) return u.error();
    if (i > 0 && !(u.value().auth == out.second))
      return Error{-1, "redis urls: every URL must carry the same credentials"};
    out.first.push_back(u.value().address);
    out.second = u.value().auth;
  }
  return out;
}

Result<std::string> redisUrlWithPassword(std::string_view url, std::string_view password) {
  // Not echoed in errors: the URL may hold a password.
  std::string_view rest = url;
  if (rest.starts_with("redis://")) rest.remove_prefix(8);
  std::string_view user;
  if (auto at = rest.rfind('@'); at != std::string_view::npos) {
    user = rest.substr(0, at);
    rest.remove_prefix(at + 1);
    if (user.find(':') != std::string_view::npos)
      return Error{-1, "redis url: has a password of its own and password_file gives one too"};
  }
  if (password.empty()) return Error{-1, "redis password: empty"};
  std::string out = "redis://";
  out += user;
  out += ':';
  static constexpr char kHex[] = "0123456789ABCDEF";
  for (unsigned char c : password) {
    if (std::isalnum(c) || c == '-' || c == '.' || c == '_' || c == '~') {
      out += static_cast<char>(c);
    } else {
      out += '%';
      out += kHex[c >> 4];
      out += kHex[c & 15];
    }
  }
  out += '@';
  out += rest;
  if (auto u = parseRedisUrl(out); !u) return u.error();
  return out;
}

}  // namespace tollgate
