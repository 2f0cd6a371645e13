// `tollgate certs …`: the local CA tooling, as a function that prints to the given streams and
// returns the process exit code (0 success, 1 failed, 2 usage error).
//   certs init DIR [--permit NAME]... [--name CN] [--force]   create the local CA in DIR
//   certs mint DIR HOST [--key-out F]                         print a leaf PEM for HOST
#pragma once

#include <cstdio>
#include <string_view>
#include <vector>

namespace tollgate {

// args[0] is the subcommand (init, mint).
int certsCommand(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err);

}  // namespace tollgate
