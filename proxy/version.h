// The version printed by `tollgate --version` and served on /v1/status.
#pragma once

namespace tollgate {

inline constexpr const char* kVersion = TOLLGATE_VERSION;

}  // namespace tollgate
