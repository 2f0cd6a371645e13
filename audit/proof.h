// Inclusion proofs (DESIGN §6, `tollgate audit prove`): evidence that one record is leaf
// `leaf_index` of the Merkle tree a signed checkpoint commits, checkable without the log.
// A proof carries the record's own line, the audit path (sibling subtree hashes only: no
// other record's content) and the checkpoint's line with its Ed25519 signature.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "audit/merkle.h"
#include "audit/signer.h"
#include "common/result.h"

namespace tollgate {

struct InclusionProof {
  std::string record;      // the record's line
  uint64_t leafIndex = 0;  // its seq - 1
  uint64_t treeSize = 0;   // the checkpoint's tree_size
  std::vector<Hash> path;  // RFC 6962 audit path, from the leaf up
  std::string checkpoint;  // the checkpoint's line, signed
};

// The proof of record `seq` against the last checkpoint of `lines` (a log verifyChain()
// accepted). Error when there is no record `seq`, or the last checkpoint does not cover it
// ("record SEQ is not yet sealed by a checkpoint").
Result<InclusionProof> proveInclusion(const std::vector<std::string>& lines, uint64_t seq);

// JSON text ({"v":1,"leaf_index":…,"tree_size":…,"record":…,"path":[hex…],
// "checkpoint":…}), and back. Decoding checks the shape only; verifyInclusionProof() the rest.
std::string encodeProof(const InclusionProof& proof);
Result<InclusionProof> decodeProof(std::string_view text);

// Checks a proof on its own: the checkpoint is a canonical checkpoint record signed by
// `key`, the tree size is the checkpoint's, the record is canonical, of the same log and at
// leaf seq - 1, and the audit path leads from its leaf hash to the checkpoint's root.
// Error: the first check that fails.
Status verifyInclusionProof(const InclusionProof& proof, const Ed25519Key& key);

}  // namespace tollgate
