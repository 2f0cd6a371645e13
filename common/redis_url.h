// Redis URLs as the config gives them: the address of a node and the credentials to AUTH
// with. Parsing only; the clients (policy/redis_client, audit/redis_replica) send the AUTH.
#pragma once

#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "common/result.h"
#include "common/units.h"

namespace tollgate {

// Who to AUTH as on every new connection; no password: no AUTH.
struct RedisAuth {
  std::string user;  // an ACL user; empty: the default user
  std::string password;
  bool operator==(const RedisAuth&) const = default;
};

struct RedisUrl {
  HostPort address;
  RedisAuth auth;
};

// Parses "redis://[[user]:password@]host[:port]", "host:port" or "host" (port 6379; "[::1]"
// too); user and password may be percent-encoded.
Result<RedisUrl> parseRedisUrl(std::string_view url);
// The seeds of a list of URLs and their one set of credentials (every URL must carry the
// same: they are the nodes of one Redis).
Result<std::pair<std::vector<HostPort>, RedisAuth>> parseRedisUrls(
    const std::vector<std::string>& urls);
// The URL with `password` as its password, percent-encoded: a password kept in a file of its
// own (store.password_file, a mounted secret). "redis://USER@HOST:PORT" names the ACL user
// it goes with; a URL with a password of its own is refused (which one counts is a guess).
Result<std::string> redisUrlWithPassword(std::string_view url, std::string_view password);

}  // namespace tollgate
