// `tollgate audit …`: the audit tooling, as functions that print to the given streams and
// return the process exit code (0 success, 1 the log or proof is invalid, 2 usage error or
// unreadable input).
#pragma once

#include <cstdio>
#include <string_view>
#include <vector>

namespace tollgate {

// args[0] is the subcommand (verify, …).
int auditCommand(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err);

}  // namespace tollgate
