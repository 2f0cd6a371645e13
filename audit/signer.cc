#include "audit/signer.h"

#include <openssl/evp.h>

#include "certs/openssl_error.h"
#include "common/sha256.h"

namespace tollgate {

Ed25519Key::Ed25519Key(EVP_PKEY* key, bool priv) : key_(key, EVP_PKEY_free), private_(priv) {}

Result<Ed25519Key> Ed25519Key::generate() {
  EVP_PKEY* key = nullptr;
  std::unique_ptr<EVP_PKEY_CTX, decltype(&EVP_PKEY_CTX_free)> ctx(
      EVP_PKEY_CTX_new_id(EVP_PKEY_ED25519, nullptr), EVP_PKEY_CTX_free);
  if (!ctx || EVP_PKEY_keygen_init(ctx.get()) <= 0 || EVP_PKEY_keygen(ctx.get(), &key) <= 0)
    return Error{-1, "ed25519 keygen: " + takeOpenSslErrors()};
  return Ed25519Key(key, true);
}

Result<Ed25519Key> Ed25519Key::fromRawPrivate(std::string_view raw) {
  if (raw.size() != 32) return Error{-1, "an ed25519 private key is 32 bytes"};
  EVP_PKEY* key = EVP_PKEY_new_raw_private_key(
      EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(raw.data()), raw.size());
  if (!key) return Error{-1, "ed25519 private key: " + takeOpenSslErrors()};
  return Ed25519Key(key, true);
}

Result<Ed25519Key> Ed25519Key::fromRawPublic(std::string_view raw) {
  if (raw.size() != 32) return Error{-1, "an ed25519 public key is 32 bytes"};
  EVP_PKEY* key = EVP_PKEY_new_raw_public_key(
      EVP_PKEY_ED25519, nullptr, reinterpret_cast<const unsigned char*>(raw.data()), raw.size());
  if (!key) return Error{-1, "ed25519 public key: " + takeOpenSslErrors()};
  return Ed25519Key(key, false);
}

std::string Ed25519Key::rawPublic() const {
  std::string out(32, '\0');
  size_t len = out.size();
  if (EVP_PKEY_get_raw_public_key(key_.get(), reinterpret_cast<unsigned char*>(out.data()), &len) <=
      0)
    return {};
  out.resize(len);
  return out;
}

bool Ed25519Key::exportRawPrivate(unsigned char* out, size_t* len) const {
  return private_ && EVP_PKEY_get_raw_private_key(key_.get(), out, len) > 0;
}

std::string Ed25519Key::id() const {
  return sha256Hex(rawPublic(), 16);
}

std::string Ed25519Key::sign(std::string_view message) const {
  if (!private_) return {};
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  std::string sig(64, '\0');
  size_t len = sig.size();
  if (!ctx || EVP_DigestSignInit(ctx.get(), nullptr, nullptr, nullptr, key_.get()) <= 0 ||
      EVP_DigestSign(ctx.get(), reinterpret_cast<unsigned char*>(sig.data()), &len,
                     reinterpret_cast<const unsigned char*>(message.data()), message.size()) <= 0)
    return {};
  sig.resize(len);
  return sig;
}

bool Ed25519Key::verify(std::string_view message, std::string_view signature) const {
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  return ctx && EVP_DigestVerifyInit(ctx.get(), nullptr, nullptr, nullptr, key_.get()) > 0 &&
         EVP_DigestVerify(ctx.get(), reinterpret_cast<const unsigned char*>(signature.data()),
                          signature.size(), reinterpret_cast<const unsigned char*>(message.data()),
                          message.size()) == 1;
}

std::string toHexBytes(std::string_view bytes) {
  static const char* digits = "0123456789abcdef";
  std::string out;
  out.reserve(bytes.size() * 2);
  for (unsigned char b : bytes) {
    out += digits[b >> 4];
    out += digits[b & 15];
  }
  return out;
}

std::string fromHexBytes(std::string_view hex) {
  if (hex.size() % 2) return {};
  std::string out;
  auto nibble = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  for (size_t i = 0; i < hex.size(); i += 2) {
    int hi = nibble(hex[i]), lo = nibble(hex[i + 1]);
    if (hi < 0 || lo < 0) return {};
    out += static_cast<char>(hi << 4 | lo);
  }
  return out;
}

}  // namespace tollgate
