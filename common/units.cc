#include "common/units.h"

#include <charconv>
#include <limits>

namespace tollgate {
namespace {

std::optional<uint64_t> parseNumber(std::string_view digits) {
  if (digits.empty()) return std::nullopt;
  uint64_t value = 0;
  auto [ptr, ec] = std::from_chars(digits.data(), digits.data() + digits.size(), value);
  if (ec != std::errc() || ptr != digits.data() + digits.size()) return std::nullopt;
  return value;
}

std::optional<uint64_t> scale(uint64_t value, uint64_t factor) {
  if (factor != 0 && value > std::numeric_limits<uint64_t>::max() / factor) return std::nullopt;
  return value * factor;
}

}  // namespace

std::optional<uint64_t> parseSize(std::string_view text) {
  uint64_t factor = 1;
  if (!text.empty()) {
    switch (text.back()) {
      case 'k':
      case 'K':
        factor = 1ull << 10;
        break;
      case 'm':
      case 'M':
        factor = 1ull << 20;
        break;
      case 'g':
      case 'G':
        factor = 1ull << 30;
        break;
      default:
        break;
    }
    if (factor != 1) text.remove_suffix(1);
  }
  auto value = parseNumber(text);
  if (!value) return std::nullopt;
  return scale(*value, factor);
}

std::optional<std::chrono::milliseconds> parseDuration(std::string_view text) {
  struct Unit {
    std::string_view suffix;
    uint64_t ms;
  };
  static constexpr Unit kUnits[] = {
      {"ms", 1}, {"s", 1000}, {"m", 60'000}, {"h", 3'600'000}, {"d", 86'400'000}};
  for (const auto& unit : kUnits) {
    if (text.size() > unit.suffix.size() && text.ends_with(unit.suffix)) {
      auto value = parseNumber(text.substr(0, text.size() - unit.suffix.size()));
      if (!value) continue;  // "5ms" must not parse as "5m" + "s"
      auto ms = scale(*value, unit.ms);
      if (!ms || *ms > static_cast<uint64_t>(std::numeric_limits<int64_t>::max())) {
        return std::nullopt;
      }
      return std::chrono::milliseconds(static_cast<int64_t>(*ms));
    }
  }
  return std::nullopt;
}

std::optional<HostPort> parseHostPort(std::string_view text) {
  HostPort out;
  std::string_view portText;
  if (text.starts_with('[')) {
    auto close = text.find(']');
    if (close == std::string_view::npos || close + 1 >= text.size() || text[close + 1] != ':') {
      return std::nullopt;
    }
    out.host = std::string(text.substr(1, close - 1));
    portText = text.substr(close + 2);
  } else {
    auto colon = text.rfind(':');
    if (colon == std::string_view::npos || text.find(':') != colon) return std::nullopt;
    out.host = std::string(text.substr(0, colon));
    portText = text.substr(colon + 1);
  }
  auto port = parseNumber(portText);
  if (out.host.empty() || !port || *port > 65535) return std::nullopt;
  out.port = static_cast<uint16_t>(*port);
  return out;
}

std::string formatHostPort(std::string_view host, uint16_t port) {
  std::string out;
  bool v6 = host.find(':') != std::string_view::npos;
  if (v6) out += '[';
  out += host;
  if (v6) out += ']';
  out += ':';
  out += std::to_string(port);
  return out;
}

}  // namespace tollgate
