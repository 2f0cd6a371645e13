// Whole-file reads and durable writes, for the audit log's keys, ids, archives and exports.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <string>
#include <string_view>

#include "common/result.h"

namespace tollgate {

Result<std::string> readFile(const std::string& path);
// Writes all of `data` to `fd` (retrying short writes and EINTR); false on an error (errno).
bool writeAll(int fd, std::string_view data);
// The same at `offset` (pwrite: the file offset is not used or moved); with `rwfFlags`
// (RWF_DSYNC...) through pwritev2.
bool pwriteAll(int fd, std::string_view data, uint64_t offset, int rwfFlags = 0);
// Replaces `path` durably: a temporary file next to it, written and fsynced, renamed over
// it, and the directory fsynced. Readers see the old or the new file, never a part.
Status writeFileAtomic(const std::string& path, std::string_view data, mode_t mode);
// The same with a copy of the file `from` (read a chunk at a time).
Status copyFileAtomic(const std::string& from, const std::string& path, mode_t mode);
// fsyncs a directory (after a rename or a new file in it).
Status syncDir(const std::string& dir);

}  // namespace tollgate
