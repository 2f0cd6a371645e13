// `tollgate policy check FILE…` and `tollgate policy test FILE…`: the policy tooling, as
// functions that print to the given streams and return the process exit code
// (0 success, 1 a check or test failed, 2 usage error).
#pragma once

#include <cstdio>
#include <string>
#include <vector>

namespace tollgate {

int policyCheck(const std::vector<std::string>& files, std::FILE* out, std::FILE* err);
int policyTest(const std::vector<std::string>& files, std::FILE* out, std::FILE* err);

}  // namespace tollgate
