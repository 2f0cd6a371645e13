// Inclusion proofs (DESIGN §6, `tollgate audit prove`): evidence that one record is leaf
// `leaf_index` of the Merkle tree a signed checkpoint commits, checkable without the log.
// A proof carries the record's own line, the audit path (sibling subtree hashes only: no
// other record's content) and the checkpoint's line with its Ed25519 signature. When the
// checkpoint's key is not the log's first one, the proof also carries the key_rotation
// records that lead from that first key (the anchor) to it.
#pragma once

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "audit/chain.h"
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
  // The key_rotation lines before the checkpoint, in order (none: signed by the anchor).
  std::vector<std::string> rotations;
};

// Builds the proof of record `seq` against the last checkpoint of a log verifyChain()
// accepted, from the log read twice, one line at a time: scan() sees every line and keeps
// the record, the last checkpoint and the rotations before it; hash() sees the lines again
// from the first and keeps only the roots of the subtrees on the audit path. Memory stays
// O(log n) whatever the log's length.
class InclusionProver {
 public:
  explicit InclusionProver(uint64_t seq) : seq_(seq) {}
  void scan(const std::string& line);
  // After the scan: the tree size to hash up to; error when there is no record `seq`, or
  // the last checkpoint does not cover it ("record SEQ is not yet sealed by a checkpoint").
  Result<uint64_t> sealed();
  // Returns false once the tree is covered: the rest of the log need not be read.
  bool hash(std::string_view line);
  // After hash() saw the tree: the proof (error when it saw less, or another record).
  Result<InclusionProof> proof();

 private:
  uint64_t seq_;
  uint64_t scanned_ = 0, hashed_ = 0;
  std::string record_, checkpoint_;
  uint64_t treeSize_ = 0;
  std::vector<std::string> rotations_;
  size_t rotationsBefore_ = 0;  // of rotations_, those before the last checkpoint
  bool sealed_ = false;
  std::vector<std::pair<uint64_t, uint64_t>> ranges_;  // the path's subtrees, leaf up
  std::vector<Hash> roots_;                            // one per range, as hashed
  std::vector<MerkleAccumulator> open_;                // the ranges being hashed
};

// The same over a log in memory.
Result<InclusionProof> proveInclusion(const std::vector<std::string>& lines, uint64_t seq);

// JSON text ({"v":1,"leaf_index":…,"tree_size":…,"record":…,"path":[hex…],
// "checkpoint":…}, and "rotations":[line…] when there are any), and back. Decoding checks the shape
// only; verifyInclusionProof() the rest.
std::string encodeProof(const InclusionProof& proof);
Result<InclusionProof> decodeProof(std::string_view text);

// Checks a proof on its own: each rotation is a canonical key_rotation record of the log,
// before the checkpoint, signed by the key active before it (from `anchor`) and by its new
// key; the checkpoint is a canonical checkpoint record signed by the key active after them;
// the tree size is the checkpoint's, the record is canonical, of the same log and at leaf
// seq - 1, and the audit path leads from its leaf hash to the checkpoint's root. With
// `pinned`, the signing key must also be listed there with the checkpoint's seq inside its
// window. Returns the signing key's id; error: the first check that fails.
Result<std::string> verifyInclusionProof(const InclusionProof& proof, const Ed25519Key& anchor,
                                         const Keyring* pinned = nullptr);

}  // namespace tollgate
