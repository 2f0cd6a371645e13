#include "policy/time_zone.h"

#include <algorithm>
#include <fstream>
#include <iterator>

namespace tollgate {
namespace {

int64_t be(const unsigned char* p, int bytes) {
  uint64_t v = 0;
  for (int i = 0; i < bytes; ++i) v = (v << 8) | p[i];
  if (bytes == 4) return static_cast<int32_t>(static_cast<uint32_t>(v));
  return static_cast<int64_t>(v);
}

}  // namespace

Result<std::shared_ptr<const TimeZone>> TimeZone::load(const std::string& name) {
  auto tz = std::make_shared<TimeZone>();
  tz->name_ = name;
  if (name == "UTC" || name == "Etc/UTC") return std::shared_ptr<const TimeZone>(tz);
  if (name.empty() || name.find("..") != std::string::npos || name[0] == '/')
    return Error{-1, "invalid time zone name"};
  std::ifstream in("/usr/share/zoneinfo/" + name, std::ios::binary);
  if (!in) return Error{-1, "unknown time zone '" + name + "'"};
  std::vector<unsigned char> d((std::istreambuf_iterator<char>(in)),
                               std::istreambuf_iterator<char>());
  // TZif: a v1 block with 32-bit times, then (v2+) a second header and 64-bit times.
  auto header = [&](size_t at, int64_t counts[6]) {
    if (d.size() < at + 44 || d[at] != 'T' || d[at + 1] != 'Z' || d[at + 2] != 'i' ||
        d[at + 3] != 'f')
      return false;
    for (int i = 0; i < 6; ++i) counts[i] = be(&d[at + 20 + 4 * i], 4);
    return true;
  };
  int64_t c[6];  // isutcnt, isstdcnt, leapcnt, timecnt, typecnt, charcnt
  if (!header(0, c)) return Error{-1, "time zone '" + name + "' is not a TZif file"};
  size_t at = 44;
  int timeBytes = 4;
  if (d[4] >= '2') {
    at += static_cast<size_t>(c[3] * 5 + c[4] * 6 + c[5] + c[2] * 8 + c[1] + c[0]);
    if (!header(at, c)) return Error{-1, "time zone '" + name + "' has a bad v2 header"};
    at += 44;
    timeBytes = 8;
  }
  size_t need = at + static_cast<size_t>(c[3] * (timeBytes + 1) + c[4] * 6);
  if (d.size() < need) return Error{-1, "time zone '" + name + "' is truncated"};
  std::vector<int32_t> typeOffsets;
  size_t types = at + static_cast<size_t>(c[3] * (timeBytes + 1));
  for (int64_t i = 0; i < c[4]; ++i)
    typeOffsets.push_back(static_cast<int32_t>(be(&d[types + 6 * i], 4)));
  if (typeOffsets.empty()) return Error{-1, "time zone '" + name + "' has no types"};
  tz->initial_ = typeOffsets[0];
  for (int64_t i = 0; i < c[3]; ++i) {
    tz->transitions_.push_back(be(&d[at + static_cast<size_t>(i * timeBytes)], timeBytes));
    auto idx = d[at + static_cast<size_t>(c[3] * timeBytes + i)];
    if (idx >= typeOffsets.size())
      return Error{-1, "time zone '" + name + "' has a bad type index"};
    tz->offsets_.push_back(typeOffsets[idx]);
  }
  return std::shared_ptr<const TimeZone>(tz);
}

int32_t TimeZone::offsetAt(int64_t utcSeconds) const {
  auto it = std::upper_bound(transitions_.begin(), transitions_.end(), utcSeconds);
  if (it == transitions_.begin()) return initial_;
  // Past the last transition the last offset holds (the zone's rule string is not read).
  return offsets_[static_cast<size_t>(it - transitions_.begin() - 1)];
}

}  // namespace tollgate
