// Turns OpenSSL's thread-local error queue into one readable message (and empties it).
#pragma once

#include <openssl/err.h>

#include <string>

namespace tollgate {

std::string takeOpenSslErrors();

// Empties the queue before a call whose failure is read from it (SSL_get_error): a stale
// entry would make a want-read look like an error. ERR_clear_error() alone clears all of
// its slots every time; the queue is nearly always empty already.
inline void clearOpenSslErrors() {
  if (ERR_peek_error() != 0) ERR_clear_error();
}

}  // namespace tollgate
