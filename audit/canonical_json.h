// Canonical JSON for audit records (DESIGN §6): object keys sorted, no insignificant
// whitespace, integers only, UTF-8 checked, duplicate keys rejected. A record is stored in
// this form and hashed as such; the verifier re-canonicalises every record and requires
// the bytes to be unchanged. Strings are written as nlohmann-json writes them with
// ensure_ascii off: `"` `\` and control characters escaped (\b \f \n \r \t, else \u00XX),
// everything else, non-ASCII included, as is.
#pragma once

#include <string>
#include <string_view>

#include "common/result.h"

namespace tollgate {

// Parses `json` strictly and writes its canonical form; errors name the first problem:
// "duplicate key", "not an integer", "invalid UTF-8", "too deep", or the parse error.
Result<std::string> canonicalJson(std::string_view json, size_t maxDepth = 64);

// Whether `json` is exactly its canonical form.
bool isCanonicalJson(std::string_view json);

}  // namespace tollgate
