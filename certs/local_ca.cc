#include "certs/local_ca.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <openssl/bio.h>
#include <openssl/bn.h>
#include <openssl/ec.h>
#include <openssl/pem.h>
#include <openssl/rand.h>
#include <openssl/x509v3.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <charconv>
#include <cstring>
#include <ctime>

#include "certs/openssl_error.h"
#include "common/files.h"

namespace tollgate {
namespace {

struct BioFree {
  void operator()(BIO* bio) const { BIO_free(bio); }
};
using BioPtr = std::unique_ptr<BIO, BioFree>;

Error sslError(const std::string& what) {
  return Error{-1, what + ": " + takeOpenSslErrors()};
}

std::string bioText(BIO* bio) {
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  return len > 0 ? std::string(data, static_cast<size_t>(len)) : std::string();
}

bool validDnsName(std::string_view name) {
  if (name.empty() || name.size() > 253) return false;
  size_t start = 0;
  while (start <= name.size()) {
    size_t dot = name.find('.', start);
    if (dot == std::string_view::npos) dot = name.size();
    std::string_view label = name.substr(start, dot - start);
    if (label.empty() || label.size() > 63 || label.front() == '-' || label.back() == '-')
      return false;
    for (char c : label) {
      bool ok = (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_';
      if (!ok) return false;
    }
    start = dot + 1;
  }
  return true;
}

std::string lowercase(std::string_view text) {
  std::string out(text);
  for (char& c : out)
    if (c >= 'A' && c <= 'Z') c = static_cast<char>(c - 'A' + 'a');
  return out;
}

// Parses an IPv4 or IPv6 literal into its bytes; false when it is neither.
bool parseIp(std::string_view text, std::vector<unsigned char>* bytes) {
  std::string s(text);
  unsigned char buf[16];
  if (inet_pton(AF_INET, s.c_str(), buf) == 1) {
    bytes->assign(buf, buf + 4);
    return true;
  }
  if (inet_pton(AF_INET6, s.c_str(), buf) == 1) {
    bytes->assign(buf, buf + 16);
    return true;
  }
  return false;
}

std::string ipText(const std::vector<unsigned char>& bytes) {
  char buf[INET6_ADDRSTRLEN] = {};
  inet_ntop(bytes.size() == 4 ? AF_INET : AF_INET6, bytes.data(), buf, sizeof buf);
  return buf;
}

bool dnsWithin(const std::string& name, const std::string& base) {
  if (base.starts_with('.')) return name.size() > base.size() && name.ends_with(base);
  if (name == base) return true;
  return name.size() > base.size() && name.ends_with(base) &&
         name[name.size() - base.size() - 1] == '.';
}

Status setRandomSerial(X509* cert) {
  unsigned char bytes[16];
  if (RAND_bytes(bytes, sizeof bytes) != 1) return sslError("random serial");
  bytes[0] &= 0x7f;  // positive, so the DER integer stays 16 bytes
  bytes[0] |= 0x01;  // and never zero
  BIGNUM* bn = BN_bin2bn(bytes, sizeof bytes, nullptr);
  bool ok = bn != nullptr && BN_to_ASN1_INTEGER(bn, X509_get_serialNumber(cert)) != nullptr;
  BN_free(bn);
  if (!ok) return sslError("random serial");
  return Status::success();
}

CertClock::time_point timePoint(const ASN1_TIME* time) {
  std::tm tm{};
  if (ASN1_TIME_to_tm(time, &tm) != 1) return {};
  return CertClock::from_time_t(timegm(&tm));
}

std::string timeText(const ASN1_TIME* time) {
  std::time_t t = CertClock::to_time_t(timePoint(time));
  std::tm tm{};
  gmtime_r(&t, &tm);
  char buf[32];
  std::strftime(buf, sizeof buf, "%Y-%m-%dT%H:%M:%SZ", &tm);
  return buf;
}

Status setValidity(X509* cert, CertClock::time_point from, CertClock::time_point to) {
  if (ASN1_TIME_set(X509_getm_notBefore(cert), CertClock::to_time_t(from)) == nullptr ||
      ASN1_TIME_set(X509_getm_notAfter(cert), CertClock::to_time_t(to)) == nullptr)
    return sslError("validity");
  return Status::success();
}

// Adds an extension given in OpenSSL's config syntax (fixed strings only, never input).
Status addExtension(X509* cert, X509* issuer, int nid, const char* value) {
  X509V3_CTX ctx;
  X509V3_set_ctx_nodb(&ctx);
  X509V3_set_ctx(&ctx, issuer, cert, nullptr, nullptr, 0);
  X509_EXTENSION* ext = X509V3_EXT_conf_nid(nullptr, &ctx, nid, value);
  if (ext == nullptr) return sslError(std::string("extension ") + OBJ_nid2sn(nid));
  int added = X509_add_ext(cert, ext, -1);
  X509_EXTENSION_free(ext);
  if (added != 1) return sslError(std::string("extension ") + OBJ_nid2sn(nid));
  return Status::success();
}

Status addCommonName(X509_NAME* name, const std::string& cn) {
  if (X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                                 reinterpret_cast<const unsigned char*>(cn.data()),
                                 static_cast<int>(cn.size()), -1, 0) != 1)
    return sslError("subject name");
  return Status::success();
}

GENERAL_NAME* dnsGeneralName(const std::string& dns) {
  GENERAL_NAME* gn = GENERAL_NAME_new();
  ASN1_IA5STRING* s = ASN1_IA5STRING_new();
  if (gn == nullptr || s == nullptr ||
      ASN1_STRING_set(s, dns.data(), static_cast<int>(dns.size())) != 1) {
    GENERAL_NAME_free(gn);
    ASN1_IA5STRING_free(s);
    return nullptr;
  }
  GENERAL_NAME_set0_value(gn, GEN_DNS, s);
  return gn;
}

GENERAL_NAME* ipGeneralName(const std::vector<unsigned char>& bytes) {
  GENERAL_NAME* gn = GENERAL_NAME_new();
  ASN1_OCTET_STRING* s = ASN1_OCTET_STRING_new();
  if (gn == nullptr || s == nullptr ||
      ASN1_OCTET_STRING_set(s, bytes.data(), static_cast<int>(bytes.size())) != 1) {
    GENERAL_NAME_free(gn);
    ASN1_OCTET_STRING_free(s);
    return nullptr;
  }
  GENERAL_NAME_set0_value(gn, GEN_IPADD, s);
  return gn;
}

// Appends a subtree with `base` (taken) to `stack`; false on allocation failure.
bool pushSubtree(STACK_OF(GENERAL_SUBTREE) * stack, GENERAL_NAME* base) {
  if (base == nullptr) return false;
  GENERAL_SUBTREE* subtree = GENERAL_SUBTREE_new();
  if (subtree == nullptr) {
    GENERAL_NAME_free(base);
    return false;
  }
  GENERAL_NAME_free(subtree->base);
  subtree->base = base;
  if (sk_GENERAL_SUBTREE_push(stack, subtree) <= 0) {
    GENERAL_SUBTREE_free(subtree);
    return false;
  }
  return true;
}

Status addNameConstraints(X509* cert, const std::vector<PermittedName>& permitted) {
  NAME_CONSTRAINTS* nc = NAME_CONSTRAINTS_new();
  if (nc == nullptr) return sslError("name constraints");
  nc->permittedSubtrees = sk_GENERAL_SUBTREE_new_null();
  nc->excludedSubtrees = sk_GENERAL_SUBTREE_new_null();
  bool ok = nc->permittedSubtrees != nullptr && nc->excludedSubtrees != nullptr;
  bool anyDns = false, anyIp = false;
  for (const auto& p : permitted) {
    if (!ok) break;
    if (p.isIp) {
      anyIp = true;
      std::vector<unsigned char> both = p.ip;
      both.insert(both.end(), p.mask.begin(), p.mask.end());
      ok = pushSubtree(nc->permittedSubtrees, ipGeneralName(both));
    } else {
      anyDns = true;
      ok = pushSubtree(nc->permittedSubtrees, dnsGeneralName(p.dns));
    }
  }
  // A name type with no permitted subtree would be unconstrained: exclude all of it.
  if (ok && !anyDns) ok = pushSubtree(nc->excludedSubtrees, dnsGeneralName(""));
  if (ok && !anyIp) {
    ok = pushSubtree(nc->excludedSubtrees, ipGeneralName(std::vector<unsigned char>(8, 0))) &&
         pushSubtree(nc->excludedSubtrees, ipGeneralName(std::vector<unsigned char>(32, 0)));
  }
  if (ok && sk_GENERAL_SUBTREE_num(nc->excludedSubtrees) == 0) {
    sk_GENERAL_SUBTREE_free(nc->excludedSubtrees);
    nc->excludedSubtrees = nullptr;
  }
  ok = ok && X509_add1_ext_i2d(cert, NID_name_constraints, nc, 1, X509V3_ADD_DEFAULT) == 1;
  NAME_CONSTRAINTS_free(nc);
  if (!ok) return sslError("name constraints");
  return Status::success();
}

// The permitted subtrees of a CA certificate we wrote (see addNameConstraints).
std::vector<PermittedName> readPermitted(X509* cert) {
  std::vector<PermittedName> out;
  auto* nc = static_cast<NAME_CONSTRAINTS*>(
      X509_get_ext_d2i(cert, NID_name_constraints, nullptr, nullptr));
  if (nc == nullptr) return out;
  for (int i = 0; nc->permittedSubtrees && i < sk_GENERAL_SUBTREE_num(nc->permittedSubtrees); ++i) {
    const GENERAL_NAME* base = sk_GENERAL_SUBTREE_value(nc->permittedSubtrees, i)->base;
    PermittedName p;
    if (base->type == GEN_DNS) {
      const ASN1_IA5STRING* s = base->d.dNSName;
      p.dns = lowercase(
          std::string_view(reinterpret_cast<const char*>(s->data), static_cast<size_t>(s->length)));
    } else if (base->type == GEN_IPADD) {
      const ASN1_OCTET_STRING* s = base->d.iPAddress;
      if (s->length != 8 && s->length != 32) continue;
      size_t half = static_cast<size_t>(s->length) / 2;
      p.isIp = true;
      p.ip.assign(s->data, s->data + half);
      p.mask.assign(s->data + half, s->data + 2 * half);
    } else {
      continue;
    }
    out.push_back(std::move(p));
  }
  NAME_CONSTRAINTS_free(nc);
  return out;
}

// Writes `content` to `path`.tmp with `mode` (whatever the umask), fsyncs it, and returns
// the temporary path for the caller to rename into place.
Result<std::string> writeTemp(const std::string& path, const std::string& content, mode_t mode) {
  std::string tmp = path + ".tmp";
  ::unlink(tmp.c_str());
  int fd = ::open(tmp.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_NOFOLLOW, mode);
  if (fd < 0) return Error{-errno, "cannot create " + tmp + ": " + std::strerror(errno)};
  bool ok = ::fchmod(fd, mode) == 0 && writeAll(fd, content);
  ok = ok && ::fsync(fd) == 0;
  int saved = errno;
  ::close(fd);
  if (!ok) {
    ::unlink(tmp.c_str());
    return Error{-saved, "cannot write " + tmp + ": " + std::strerror(saved)};
  }
  return tmp;
}

}  // namespace

Result<EvpPkeyPtr> generateP256Key() {
  EvpPkeyPtr key(EVP_EC_gen("P-256"));
  if (!key) return sslError("P-256 key generation");
  return key;
}

std::string certificateToPem(X509* cert) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_X509(bio.get(), cert) != 1) return {};
  return bioText(bio.get());
}

std::string privateKeyToPem(EVP_PKEY* key) {
  BioPtr bio(BIO_new(BIO_s_mem()));
  if (!bio || PEM_write_bio_PrivateKey(bio.get(), key, nullptr, nullptr, 0, nullptr, nullptr) != 1)
    return {};
  return bioText(bio.get());
}

std::string certificateFingerprint(X509* cert) {
  unsigned char md[EVP_MAX_MD_SIZE];
  unsigned int len = 0;
  if (X509_digest(cert, EVP_sha256(), md, &len) != 1) return {};
  static const char* hex = "0123456789ABCDEF";
  std::string out = "SHA256:";
  for (unsigned int i = 0; i < len; ++i) {
    if (i > 0) out += ':';
    out += hex[md[i] >> 4];
    out += hex[md[i] & 15];
  }
  return out;
}

Result<LeafHost> parseLeafHost(std::string_view host) {
  LeafHost out;
  if (host.size() >= 2 && host.front() == '[' && host.back() == ']') {
    if (!parseIp(host.substr(1, host.size() - 2), &out.ipBytes) || out.ipBytes.size() != 16)
      return Error{-1, "not an IPv6 literal: " + std::string(host)};
    out.isIp = true;
    out.name = ipText(out.ipBytes);
    return out;
  }
  if (parseIp(host, &out.ipBytes)) {
    out.isIp = true;
    out.name = ipText(out.ipBytes);
    return out;
  }
  std::string name = lowercase(host);
  if (name.ends_with('.')) name.pop_back();
  if (!validDnsName(name)) return Error{-1, "not a DNS name or IP address: '" + name + "'"};
  out.name = std::move(name);
  return out;
}

std::string PermittedName::text() const {
  if (!isIp) return dns;
  int prefix = 0;
  for (unsigned char b : mask)
    for (int bit = 7; bit >= 0; --bit) prefix += (b >> bit) & 1;
  return ipText(ip) + "/" + std::to_string(prefix);
}

Result<PermittedName> parsePermittedName(std::string_view text) {
  PermittedName out;
  std::string_view addr = text;
  std::string_view prefixText;
  if (auto slash = text.find('/'); slash != std::string_view::npos) {
    addr = text.substr(0, slash);
    prefixText = text.substr(slash + 1);
  }
  if (parseIp(addr, &out.ip)) {
    int bits = static_cast<int>(out.ip.size()) * 8;
    int prefix = bits;
    if (!prefixText.empty() || addr.size() != text.size()) {
      auto [end, ec] =
          std::from_chars(prefixText.data(), prefixText.data() + prefixText.size(), prefix);
      if (ec != std::errc() || end != prefixText.data() + prefixText.size() || prefix < 0 ||
          prefix > bits)
        return Error{-1, "bad prefix length in '" + std::string(text) + "'"};
    }
    out.isIp = true;
    out.mask.assign(out.ip.size(), 0);
    for (int i = 0; i < prefix; ++i) out.mask[i / 8] |= static_cast<unsigned char>(0x80 >> (i % 8));
    for (size_t i = 0; i < out.ip.size(); ++i) out.ip[i] &= out.mask[i];
    return out;
  }
  std::string dns = lowercase(text);
  std::string_view rest = dns;
  if (rest.starts_with('.')) rest.remove_prefix(1);
  if (!validDnsName(rest))
    return Error{-1, "not a DNS name, IP address or CIDR range: '" + std::string(text) + "'"};
  out.dns = std::move(dns);
  return out;
}

Result<LocalCa> LocalCa::create(const Options& options) {
  auto key = generateP256Key();
  if (!key) return key.error();
  X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), X509_VERSION_3) != 1) return sslError("CA certificate");
  if (auto st = setRandomSerial(cert.get()); !st) return st.error();
  // Backdated like the leaves, so a host whose clock is a little behind still accepts it.
  if (auto st = setValidity(cert.get(), options.now - std::chrono::hours(1),
                            options.now + options.validity);
      !st)
    return st.error();
  X509_NAME* name = X509_get_subject_name(cert.get());
  if (auto st = addCommonName(name, options.commonName); !st) return st.error();
  if (X509_set_issuer_name(cert.get(), name) != 1 || X509_set_pubkey(cert.get(), key->get()) != 1)
    return sslError("CA certificate");
  for (auto [nid, value] : {std::pair{NID_basic_constraints, "critical,CA:TRUE,pathlen:0"},
                            std::pair{NID_key_usage, "critical,keyCertSign,cRLSign"},
                            std::pair{NID_subject_key_identifier, "hash"}}) {
    if (auto st = addExtension(cert.get(), cert.get(), nid, value); !st) return st.error();
  }
  if (!options.permitted.empty()) {
    if (auto st = addNameConstraints(cert.get(), options.permitted); !st) return st.error();
  }
  if (X509_sign(cert.get(), key->get(), EVP_sha256()) <= 0) return sslError("signing the CA");
  return LocalCa(std::move(key.value()), std::move(cert), options.permitted);
}

Result<LocalCa> LocalCa::load(const std::string& dir) {
  std::string certPath = dir + "/ca.crt", keyPath = dir + "/ca.key";
  BioPtr certBio(BIO_new_file(certPath.c_str(), "r"));
  if (!certBio) return Error{-1, "cannot read " + certPath + ": " + takeOpenSslErrors()};
  X509Ptr cert(PEM_read_bio_X509(certBio.get(), nullptr, nullptr, nullptr));
  if (!cert) return sslError(certPath + " is not a PEM certificate");
  BioPtr keyBio(BIO_new_file(keyPath.c_str(), "r"));
  if (!keyBio) return Error{-1, "cannot read " + keyPath + ": " + takeOpenSslErrors()};
  EvpPkeyPtr key(PEM_read_bio_PrivateKey(keyBio.get(), nullptr, nullptr, nullptr));
  if (!key) return sslError(keyPath + " is not a PEM private key");
  if (X509_check_private_key(cert.get(), key.get()) != 1)
    return sslError(keyPath + " does not belong to " + certPath);
  if (X509_check_ca(cert.get()) < 1) return Error{-1, certPath + " is not a CA certificate"};
  // Every leaf of a CA outside its validity fails at the agents: refused here, with why.
  if (X509_cmp_current_time(X509_get0_notAfter(cert.get())) <= 0)
    return Error{-1, certPath + " expired on " + timeText(X509_get0_notAfter(cert.get())) +
                         ": make a new CA (tollgate certs init DIR --force) and give the agents "
                         "its ca.crt"};
  if (X509_cmp_current_time(X509_get0_notBefore(cert.get())) > 0)
    return Error{-1, certPath + " is not valid before " +
                         timeText(X509_get0_notBefore(cert.get())) + " (is the clock right?)"};
  auto permitted = readPermitted(cert.get());
  return LocalCa(std::move(key), std::move(cert), std::move(permitted));
}

Status LocalCa::write(const std::string& dir, bool force) const {
  if (::mkdir(dir.c_str(), 0700) != 0 && errno != EEXIST)
    return Error{-errno, "cannot create " + dir + ": " + std::strerror(errno)};
  if (::chmod(dir.c_str(), 0700) != 0)
    return Error{-errno, "cannot restrict " + dir + " to 0700: " + std::strerror(errno)};
  std::string keyPath = dir + "/ca.key", certPath = dir + "/ca.crt";
  struct stat st;
  if (!force && (::lstat(keyPath.c_str(), &st) == 0 || ::lstat(certPath.c_str(), &st) == 0))
    return Error{-EEXIST, dir +
                              " already holds a CA (ca.key, ca.crt); --force replaces it, "
                              "and agents that trust the old one must be given the new one"};
  std::string keyPem = privateKeyToPem(key_.get()), certPem = certificateToPem(cert_.get());
  if (keyPem.empty() || certPem.empty()) return sslError("PEM encoding");
  auto keyTmp = writeTemp(keyPath, keyPem, 0600);
  if (!keyTmp) return keyTmp.error();
  auto certTmp = writeTemp(certPath, certPem, 0644);
  if (!certTmp) {
    ::unlink(keyTmp->c_str());
    return certTmp.error();
  }
  if (::rename(keyTmp->c_str(), keyPath.c_str()) != 0 ||
      ::rename(certTmp->c_str(), certPath.c_str()) != 0) {
    int saved = errno;
    ::unlink(keyTmp->c_str());
    ::unlink(certTmp->c_str());
    return Error{-saved, "cannot write the CA into " + dir + ": " + std::strerror(saved)};
  }
  int dirFd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirFd >= 0) {
    ::fsync(dirFd);  // the renames survive a crash
    ::close(dirFd);
  }
  return Status::success();
}

bool LocalCa::permits(const LeafHost& host) const {
  if (permitted_.empty()) return true;
  for (const auto& p : permitted_) {
    if (p.isIp != host.isIp) continue;
    if (!host.isIp) {
      if (dnsWithin(host.name, p.dns)) return true;
      continue;
    }
    if (p.ip.size() != host.ipBytes.size()) continue;
    bool within = true;
    for (size_t i = 0; i < p.ip.size(); ++i)
      within = within && (host.ipBytes[i] & p.mask[i]) == p.ip[i];
    if (within) return true;
  }
  return false;
}

Result<X509Ptr> LocalCa::signLeaf(const LeafHost& host, EVP_PKEY* leafKey,
                                  const LeafOptions& options) const {
  X509Ptr cert(X509_new());
  if (!cert || X509_set_version(cert.get(), X509_VERSION_3) != 1) return sslError("leaf");
  if (auto st = setRandomSerial(cert.get()); !st) return st.error();
  // Never past the CA's own end: a leaf the CA's expiry cuts short is minted again sooner.
  auto until = std::min(options.now + options.lifetime, timePoint(X509_get0_notAfter(cert_.get())));
  if (auto st = setValidity(cert.get(), options.now - options.backdate, until); !st)
    return st.error();
  // CN only for DNS names that fit (64 characters): verifiers match the SAN, and a CN that
  // looks like a DNS name would be checked against the DNS constraints on an IP leaf.
  X509_NAME* subject = X509_get_subject_name(cert.get());
  if (!host.isIp && host.name.size() <= 64) {
    if (auto st = addCommonName(subject, host.name); !st) return st.error();
  } else if (X509_NAME_add_entry_by_txt(subject, "O", MBSTRING_UTF8,
                                        reinterpret_cast<const unsigned char*>("Tollgate"), -1, -1,
                                        0) != 1) {
    return sslError("leaf subject");
  }
  if (X509_set_issuer_name(cert.get(), X509_get_subject_name(cert_.get())) != 1 ||
      X509_set_pubkey(cert.get(), leafKey) != 1)
    return sslError("leaf");
  for (auto [nid, value] :
       {std::pair{NID_basic_constraints, "critical,CA:FALSE"},
        std::pair{NID_key_usage, "critical,digitalSignature"},
        std::pair{NID_ext_key_usage, "serverAuth"}, std::pair{NID_subject_key_identifier, "hash"},
        std::pair{NID_authority_key_identifier, "keyid:always"}}) {
    if (auto st = addExtension(cert.get(), cert_.get(), nid, value); !st) return st.error();
  }
  GENERAL_NAMES* names = sk_GENERAL_NAME_new_null();
  GENERAL_NAME* name = host.isIp ? ipGeneralName(host.ipBytes) : dnsGeneralName(host.name);
  bool ok = names != nullptr && name != nullptr && sk_GENERAL_NAME_push(names, name) > 0;
  if (!ok) GENERAL_NAME_free(name);
  ok = ok && X509_add1_ext_i2d(cert.get(), NID_subject_alt_name, names, 0, X509V3_ADD_DEFAULT) == 1;
  GENERAL_NAMES_free(names);
  if (!ok) return sslError("leaf subjectAltName");
  if (X509_sign(cert.get(), key_.get(), EVP_sha256()) <= 0) return sslError("signing the leaf");
  return cert;
}

}  // namespace tollgate
