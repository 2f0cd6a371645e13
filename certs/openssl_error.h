// Turns OpenSSL's thread-local error queue into one readable message (and empties it).
#pragma once

#include <string>

namespace tollgate {

std::string takeOpenSslErrors();

}  // namespace tollgate
