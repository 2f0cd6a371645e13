// The policy archive of an audit log: every policy set a sidecar loaded, kept by digest
// next to the segments so that any recorded decision can be re-evaluated later with the set
// that made it (`tollgate audit replay`). One file per set:
//   DIR/policies/<hex>.json   {"digest":"sha256:<hex>","files":[{"content":…,"path":…}],"v":1}
// in canonical JSON (sorted keys, no whitespace): the files in load order, each with its
// path as the config named it and its exact bytes, which is what the digest is computed
// over. The archive knows nothing of the policy language (audit/ never includes policy/);
// it stores and returns (path, content) pairs.
#pragma once

#include <string>
#include <utility>
#include <vector>

#include "common/result.h"

namespace tollgate {

using ArchivedFiles = std::vector<std::pair<std::string, std::string>>;  // path, content

// DIR/policies/<hex>.json for "sha256:<hex>"; empty when the digest is not of that form.
std::string policyArchivePath(const std::string& auditDir, const std::string& digest);

// Writes the set's archive unless an identical one is there (idempotent): a temporary file,
// fsync, rename, fsync of the directory, so a crash leaves the old file or the whole new one.
Status archivePolicySet(const std::string& auditDir, const std::string& digest,
                        const ArchivedFiles& files);

// The files of an archived set. Error: missing, unreadable or not an archive of `digest`.
Result<ArchivedFiles> readPolicyArchive(const std::string& auditDir, const std::string& digest);

}  // namespace tollgate
