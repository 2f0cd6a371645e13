#include "audit/policy_archive.h"

#include <filesystem>
#include <nlohmann/json.hpp>

#include "common/files.h"

namespace tollgate {
namespace {

namespace fs = std::filesystem;
using Json = nlohmann::json;

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
  if (auto existing = readFile(path); existing && existing.value() == text)
    return Status::success();

  fs::path dir = fs::path(path).parent_path();
  std::error_code ec;
  bool created = !fs::is_directory(dir, ec);
  fs::create_directories(dir, ec);
  if (ec) return Error{-1, "policy archive " + dir.string() + ": " + ec.message()};
  if (auto st = writeFileAtomic(path, text, 0644); !st)
    return Error{-1, "cannot write the policy archive " + path + ": " + st.error().message};
  if (created) return syncDir(dir.parent_path().string());
  return Status::success();
}

Result<ArchivedFiles> readPolicyArchive(const std::string& auditDir, const std::string& digest) {
  std::string path = policyArchivePath(auditDir, digest);
  if (path.empty()) return Error{-1, "not a sha256 digest: '" + digest + "'"};
  auto text = readFile(path);
  if (!text) return Error{-1, "archive missing: " + path};
  Json doc = Json::parse(text.value(), nullptr, false);
  // Every check by type first: an archive edited by hand must be refused, not throw.
  if (doc.is_discarded() || !doc.is_object() || !doc.contains("files") ||
      !doc["files"].is_array() || !doc.contains("digest") || !doc["digest"].is_string() ||
      doc["digest"].get<std::string>() != digest)
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
