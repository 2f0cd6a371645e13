#include "common/sha256.h"

#include <openssl/evp.h>

#include <algorithm>
#include <memory>

namespace tollgate {
namespace {

const EVP_MD* fetchedSha256() {
  // Fetched once for the process and kept (freed by OpenSSL's cleanup at exit).
  static EVP_MD* md = EVP_MD_fetch(nullptr, "SHA256", nullptr);
  return md;
}

}  // namespace

Sha256Digest sha256(std::initializer_list<std::string_view> parts) {
  thread_local std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(),
                                                                           EVP_MD_CTX_free);
  Sha256Digest out;
  unsigned int len = 0;
  EVP_DigestInit_ex2(ctx.get(), fetchedSha256(), nullptr);
  for (auto p : parts) EVP_DigestUpdate(ctx.get(), p.data(), p.size());
  EVP_DigestFinal_ex(ctx.get(), out.data(), &len);
  return out;
}

namespace {

void hexInto(const Sha256Digest& md, size_t n, char* out) {
  static constexpr char kHex[] = "0123456789abcdef";
  for (size_t i = 0; i < n; ++i) {
    out[2 * i] = kHex[md[i] >> 4];
    out[2 * i + 1] = kHex[md[i] & 0xF];
  }
}

}  // namespace

std::string sha256Hex(std::string_view data, size_t bytes) {
  size_t n = std::min<size_t>(32, bytes);
  std::string out(2 * n, '\0');
  hexInto(sha256({data}), n, out.data());
  return out;
}

void sha256HexInto(std::string_view data, std::string& out) {
  out.resize(64);
  hexInto(sha256({data}), 32, out.data());
}

}  // namespace tollgate
