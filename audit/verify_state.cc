#include "audit/verify_state.h"

#include <fcntl.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

#include "audit/chain.h"
#include "audit/merkle.h"

namespace tollgate {
namespace {

using Json = nlohmann::json;
namespace fs = std::filesystem;

bool isHash(const Json& j) {
  return j.is_string() && hashFromHex(j.get<std::string>()).has_value();
}

std::string shortHash(const std::string& hex) {
  return hex.substr(0, 16) + "…";
}

}  // namespace

Result<TrustedCheckpoint> trustedCheckpointOf(std::string_view line) {
  Json r = Json::parse(line, nullptr, false);
  if (!r.is_object() || stringField(r, "kind") != "checkpoint" || !r.contains("log_id") ||
      !r["log_id"].is_string() || !r.contains("tree_size") ||
      !r["tree_size"].is_number_unsigned() || !r.contains("root") || !isHash(r["root"]) ||
      !r.contains("seq") || !r["seq"].is_number_unsigned())
    return Error{-1, "not a checkpoint record"};
  return TrustedCheckpoint{r["log_id"].get<std::string>(), r["tree_size"].get<uint64_t>(),
                           r["root"].get<std::string>(), lineHash(line), r["seq"].get<uint64_t>()};
}

std::string encodeVerifyState(const TrustedCheckpoint& t) {
  Json j = {{"v", 1},         {"log_id", t.logId},         {"tree_size", t.treeSize},
            {"root", t.root}, {"checkpoint_hash", t.hash}, {"seq", t.seq}};
  return j.dump() + "\n";
}

Result<TrustedCheckpoint> decodeVerifyState(std::string_view text) {
  Json j = Json::parse(text, nullptr, false);
  if (j.is_discarded()) return Error{-1, "not JSON"};
  if (!j.is_object() || j.size() != 6) return Error{-1, "not a verify state object"};
  if (!j.contains("v") || j["v"] != 1) return Error{-1, "unknown state version"};
  if (!j.contains("log_id") || !j["log_id"].is_string() || j["log_id"].get<std::string>().empty())
    return Error{-1, "missing or bad \"log_id\""};
  if (!j.contains("tree_size") || !j["tree_size"].is_number_unsigned())
    return Error{-1, "missing or bad \"tree_size\""};
  if (!j.contains("seq") || !j["seq"].is_number_unsigned() ||
      j["seq"].get<uint64_t>() != j["tree_size"].get<uint64_t>() + 1)
    return Error{-1, "missing or bad \"seq\" (a checkpoint's seq is its tree_size + 1)"};
  if (!j.contains("root") || !isHash(j["root"])) return Error{-1, "missing or bad \"root\""};
  if (!j.contains("checkpoint_hash") || !isHash(j["checkpoint_hash"]))
    return Error{-1, "missing or bad \"checkpoint_hash\""};
  return TrustedCheckpoint{j["log_id"].get<std::string>(), j["tree_size"].get<uint64_t>(),
                           j["root"].get<std::string>(), j["checkpoint_hash"].get<std::string>(),
                           j["seq"].get<uint64_t>()};
}

Result<std::optional<TrustedCheckpoint>> loadVerifyState(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec) && !ec) return std::optional<TrustedCheckpoint>{};
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{-1, "cannot read the state file " + path};
  std::stringstream ss;
  ss << in.rdbuf();
  if (in.bad()) return Error{-1, "cannot read the state file " + path};
  auto t = decodeVerifyState(ss.str());
  if (!t) return Error{-1, "the state file " + path + " is corrupt: " + t.error().message};
  return std::optional<TrustedCheckpoint>(t.value());
}

Status saveVerifyState(const std::string& path, const TrustedCheckpoint& trusted) {
  std::string data = encodeVerifyState(trusted);
  std::string tmp = path + ".tmp";
  auto fail = [&](const std::string& what) {
    return Error{-errno, what + " " + tmp + ": " + std::strerror(errno)};
  };
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return fail("open");
  size_t done = 0;
  while (done < data.size()) {
    ssize_t n = ::write(fd, data.data() + done, data.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) {
      Error e = fail("write");
      ::close(fd);
      return e;
    }
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd) != 0) {
    Error e = fail("fsync");
    ::close(fd);
    return e;
  }
  ::close(fd);
  if (::rename(tmp.c_str(), path.c_str()) != 0) return fail("rename");
  // The rename itself is durable once the directory is synced.
  fs::path parent = fs::path(path).parent_path();
  if (parent.empty()) parent = ".";
  int dirFd = ::open(parent.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirFd >= 0) {
    ::fsync(dirFd);
    ::close(dirFd);
  }
  return Status::success();
}

StateVerdict checkTrustedCheckpoint(const std::vector<std::string>& lines,
                                    const TrustedCheckpoint& t) {
  return checkTrustedCheckpoint(lines.empty() ? std::string_view() : lines.front(), lines.size(),
                                t.seq >= 1 && t.seq <= lines.size() ? lines[t.seq - 1] : "", t);
}

StateVerdict checkTrustedCheckpoint(std::string_view firstLine, uint64_t lines,
                                    std::string_view lineAtSeq, const TrustedCheckpoint& t) {
  auto bad = [](uint64_t line, std::string reason) {
    return StateVerdict{false, line, std::move(reason)};
  };
  const std::string at = "the trusted checkpoint (seq " + std::to_string(t.seq) + ", tree size " +
                         std::to_string(t.treeSize) + ")";
  if (lines == 0) return bad(0, "truncated: the log is empty, but " + at + " was seen");
  Json first = Json::parse(firstLine, nullptr, false);
  std::string logId = stringField(first, "log_id");
  if (logId != t.logId)
    return bad(1, "another log: log id " + logId + " is not the trusted log " + t.logId +
                      " (the log was replaced)");
  if (lines < t.seq)
    return bad(0, "truncated: the log has " + std::to_string(lines) + " records, fewer than " + at +
                      " covers");
  std::string_view line = lineAtSeq;
  Json r = Json::parse(line, nullptr, false);
  if (!r.is_object() || stringField(r, "kind") != "checkpoint")
    return bad(t.seq, at + " is gone: record " + std::to_string(t.seq) +
                          " is not a checkpoint now (rolled back and rewritten, or a fork)");
  if (!r.contains("tree_size") || r["tree_size"] != t.treeSize)
    return bad(t.seq, "fork: the checkpoint at seq " + std::to_string(t.seq) + " has tree size " +
                          (r.contains("tree_size") ? r["tree_size"].dump() : "none") + ", " + at +
                          " had " + std::to_string(t.treeSize));
  if (!r.contains("root") || r["root"] != t.root)
    return bad(t.seq, "fork: the checkpoint at tree size " + std::to_string(t.treeSize) +
                          " has root " + shortHash(stringField(r, "root")) +
                          ", the trusted root is " + shortHash(t.root) +
                          " (records before it differ: rollback or fork)");
  if (lineHash(line) != t.hash)
    return bad(t.seq, "fork: the checkpoint at tree size " + std::to_string(t.treeSize) +
                          " is not the trusted one (same root, another checkpoint line hash " +
                          shortHash(lineHash(line)) + ", trusted " + shortHash(t.hash) + ")");
  return {};
}

}  // namespace tollgate
