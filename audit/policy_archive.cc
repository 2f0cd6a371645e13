#include "audit/policy_archive.h"

#include <fcntl.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <nlohmann/json.hpp>
#include <sstream>

namespace tollgate {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

Status syncPath(const fs::path& p) {
  int fd = ::open(p.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) return Error{-errno, "open " + p.string() + ": " + std::strerror(errno)};
  int rc = ::fsync(fd);
  ::close(fd);
  if (rc != 0) return Error{-errno, "fsync " + p.string() + ": " + std::strerror(errno)};
  return Status::success();
}

bool readWhole(const fs::path& p, std::string& out) {
  std::ifstream in(p, std::ios::binary);
  if (!in) return false;
  std::stringstream ss;
  ss << in.rdbuf();
  out = ss.str();
  return true;
}

}  // namespace

std::string policyArchivePath(const std::string& auditDir, const std::string& digest) {
  constexpr std::string_view kPrefix = "sha256:";
  if (!digest.starts_with(kPrefix) || digest.size() != kPrefix.size() + 64) return {};
  std::string hex = digest.substr(kPrefix.size());
  if (hex.find_first_not_of("0123456789abcdef") != std::string::npos) return {};
  return (fs::path(auditDir) / "policies" / (hex + ".json")).string();
}

Status archivePolicySet(const std::string& auditDir, const std::string& digest,
                        const ArchivedFiles& files) {
  std::string path = policyArchivePath(auditDir, digest);
  if (path.empty()) return Error{-1, "policy archive: not a sha256 digest: " + digest};
  Json doc = {{"v", 1}, {"digest", digest}, {"files", Json::array()}};
  for (const auto& [p, content] : files)
    doc["files"].push_back({{"path", p}, {"content", content}});
  std::string text;
  try {
    text = doc.dump(-1, ' ', false, Json::error_handler_t::strict) + "\n";
  } catch (const Json::exception& e) {
    return Error{-1, "policy archive: a policy file is not UTF-8 text: " + std::string(e.what())};
  }
  std::string existing;
  if (readWhole(path, existing) && existing == text) return Status::success();

  fs::path dir = fs::path(path).parent_path();
  std::error_code ec;
  bool created = !fs::is_directory(dir, ec);
  fs::create_directories(dir, ec);
  if (ec) return Error{-1, "policy archive " + dir.string() + ": " + ec.message()};
  // Unique per process and call: reloads from the admin API and from signals may overlap.
  static std::atomic<uint64_t> counter{0};
  fs::path tmp = dir / (".tmp-" + std::to_string(::getpid()) + "-" +
                        std::to_string(counter.fetch_add(1)) + ".json");
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) return Error{-errno, "open " + tmp.string() + ": " + std::strerror(errno)};
  size_t done = 0;
  bool ok = true;
  while (ok && done < text.size()) {
    ssize_t n = ::write(fd, text.data() + done, text.size() - done);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0)
      ok = false;
    else
      done += static_cast<size_t>(n);
  }
  ok = ok && ::fsync(fd) == 0;
  ::close(fd);
  if (!ok || ::rename(tmp.c_str(), path.c_str()) != 0) {
    std::string why = std::strerror(errno);
    ::unlink(tmp.c_str());
    return Error{-1, "cannot write the policy archive " + path + ": " + why};
  }
  if (auto st = syncPath(dir); !st) return st;
  if (created) return syncPath(dir.parent_path());
  return Status::success();
}

Result<ArchivedFiles> readPolicyArchive(const std::string& auditDir, const std::string& digest) {
  std::string path = policyArchivePath(auditDir, digest);
  if (path.empty()) return Error{-1, "not a sha256 digest: '" + digest + "'"};
  std::string text;
  if (!readWhole(path, text)) return Error{-1, "archive missing: " + path};
  Json doc = Json::parse(text, nullptr, false);
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("files") ||
      !doc["files"].is_array() || doc.value("digest", "") != digest)
    return Error{-1, "not an archive of " + digest + ": " + path};
  ArchivedFiles out;
  for (const auto& f : doc["files"]) {
    if (!f.is_object() || !f.contains("path") || !f.contains("content") || !f["path"].is_string() ||
        !f["content"].is_string())
      return Error{-1,
                   "not an archive of " + digest + " (a file without path and content): " + path};
    out.emplace_back(f["path"].get<std::string>(), f["content"].get<std::string>());
  }
  return out;
}

}  // namespace tollgate
