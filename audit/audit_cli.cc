#include "audit/audit_cli.h"

#include <fstream>
#include <map>
#include <string>

#include "audit/chain.h"
#include "audit/file_sink.h"

namespace tollgate {
namespace {

int usageError(std::FILE* err, const std::string& message) {
  std::fprintf(err, "tollgate: %s (see 'tollgate help')\n", message.c_str());
  return 2;
}

int auditVerify(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir, pubkey;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--pubkey") {
      if (i + 1 >= args.size()) return usageError(err, "--pubkey needs a file");
      pubkey = std::string(args[++i]);
    } else if (dir.empty() && !args[i].starts_with("-")) {
      dir = std::string(args[i]);
    } else {
      return usageError(err, "audit verify: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (dir.empty()) return usageError(err, "audit verify needs a DIR");
  if (pubkey.empty()) pubkey = dir + "/keys/ed25519.pub";
  std::ifstream in(pubkey);
  std::string hex;
  if (!(in >> hex)) {
    std::fprintf(err, "tollgate: cannot read the public key %s\n", pubkey.c_str());
    return 2;
  }
  auto key = Ed25519Key::fromRawPublic(fromHexBytes(hex));
  if (!key) {
    std::fprintf(err, "tollgate: %s: %s\n", pubkey.c_str(), key.error().message.c_str());
    return 2;
  }
  std::vector<std::string> segmentOf;
  auto lines = readAuditLog(dir, &segmentOf);
  if (!lines) {
    std::fprintf(err, "tollgate: %s\n", lines.error().message.c_str());
    return 2;
  }
  std::map<std::string, Ed25519Key> keys{{key.value().id(), key.value()}};
  auto v = verifyChain(lines.value(), keys);
  if (!v.ok) {
    // The line within its segment.
    size_t within = 0;
    for (size_t i = 0; i < v.line; ++i)
      within = i > 0 && segmentOf[i] != segmentOf[i - 1] ? 1 : within + 1;
    std::fprintf(out, "INVALID %s:%zu (record %llu): %s\n", segmentOf[v.line - 1].c_str(), within,
                 static_cast<unsigned long long>(v.line), v.reason.c_str());
    return 1;
  }
  std::fprintf(
      out, "ok: %llu records, %llu checkpoints, %llu after the last checkpoint (unsealed)\n",
      static_cast<unsigned long long>(v.records), static_cast<unsigned long long>(v.checkpoints),
      static_cast<unsigned long long>(v.unsealed));
  return 0;
}

}  // namespace

int auditCommand(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  if (args.empty()) return usageError(err, "audit needs verify");
  std::vector<std::string_view> rest(args.begin() + 1, args.end());
  if (args[0] == "verify") return auditVerify(rest, out, err);
  return usageError(err, "unknown audit command '" + std::string(args[0]) + "'");
}

}  // namespace tollgate
