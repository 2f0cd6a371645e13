// The verifier's memory (DESIGN §6, `tollgate audit verify --state F`): the last checkpoint
// it trusted. A later run checks that the log still holds that very checkpoint at its place,
// so a log cut back (truncation), rolled back to an older state and rewritten, forked, or
// replaced by another log is caught even when it is consistent in itself. The state is one
// canonical JSON object in a file replaced atomically (temp file, fsync, rename, fsync of
// the directory), and only advanced when the log verifies.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "common/result.h"

namespace tollgate {

struct TrustedCheckpoint {
  std::string logId;
  uint64_t treeSize = 0;  // the records the checkpoint commits (every one before it)
  std::string root;       // their Merkle root, hex
  std::string hash;       // lineHash() of the checkpoint's line
  uint64_t seq = 0;       // the checkpoint's own seq (treeSize + 1)

  bool operator==(const TrustedCheckpoint&) const = default;
};

// From a checkpoint line that verifyChain() accepted.
Result<TrustedCheckpoint> trustedCheckpointOf(std::string_view line);

// The state file's text, and back. Parsing rejects anything but the exact fields and types.
std::string encodeVerifyState(const TrustedCheckpoint& trusted);
Result<TrustedCheckpoint> decodeVerifyState(std::string_view text);

// Reads the state; nullopt when the file does not exist yet (a first run). Error: the file
// cannot be read or is not a state.
Result<std::optional<TrustedCheckpoint>> loadVerifyState(const std::string& path);
// Replaces the state atomically: readers see the old state or the new one, never a mix.
Status saveVerifyState(const std::string& path, const TrustedCheckpoint& trusted);

struct StateVerdict {
  bool ok = true;
  uint64_t line = 0;  // 1-based line the reason is about; 0 when it is about the whole log
  std::string reason;
};

// Whether `lines`, a log verifyChain() accepted, still hold the trusted checkpoint at its
// place (and so every record it committed): else truncation, rollback, fork or another log.
StateVerdict checkTrustedCheckpoint(const std::vector<std::string>& lines,
                                    const TrustedCheckpoint& trusted);
// The same from what a reader streaming the log kept: its first line, its number of lines,
// and its line at the trusted checkpoint's seq (empty when the log is shorter).
StateVerdict checkTrustedCheckpoint(std::string_view firstLine, uint64_t lines,
                                    std::string_view lineAtSeq, const TrustedCheckpoint& trusted);

}  // namespace tollgate
