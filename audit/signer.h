// Ed25519 keys for audit checkpoints (OpenSSL). A key is known by its id: the first 16
// bytes of SHA-256 of the raw 32-byte public key, as hex.
#pragma once

#include <memory>
#include <string>
#include <string_view>

#include "common/result.h"

typedef struct evp_pkey_st EVP_PKEY;

namespace tollgate {

class Ed25519Key {
 public:
  static Result<Ed25519Key> generate();
  static Result<Ed25519Key> fromRawPrivate(std::string_view raw32);
  static Result<Ed25519Key> fromRawPublic(std::string_view raw32);  // verify only

  bool canSign() const { return private_; }
  std::string rawPublic() const;  // 32 bytes
  bool exportRawPrivate(unsigned char* out, size_t* len) const;
  std::string id() const;  // 32 hex digits
  // 64-byte signature; empty on failure (or for a public-only key).
  std::string sign(std::string_view message) const;
  bool verify(std::string_view message, std::string_view signature) const;

 private:
  Ed25519Key(EVP_PKEY* key, bool priv);
  std::shared_ptr<EVP_PKEY> key_;
  bool private_ = false;
};

std::string toHexBytes(std::string_view bytes);
std::string fromHexBytes(std::string_view hex);  // empty when not hex

}  // namespace tollgate
