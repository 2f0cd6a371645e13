// The local CA: it is a CA, its name constraints are written and enforced by a verifier, its
// leaves verify for DNS names and IP literals with the right SAN, lifetime and EKU, and it
// is written to disk with safe permissions and refuses to overwrite itself.
#include "certs/local_ca.h"

#include <gtest/gtest.h>
#include <openssl/err.h>
#include <sys/stat.h>

#include <filesystem>
#include <fstream>

#include "tests/unit/certs/cert_test_util.h"

namespace tollgate {
namespace {

using namespace std::chrono_literals;
using testing::verifyLeaf;

const CertClock::time_point kNow = CertClock::from_time_t(1'800'000'000);

LocalCa makeCa(std::vector<std::string> permits = {}, CertClock::time_point now = kNow) {
  LocalCa::Options options;
  options.now = now;
  for (const auto& p : permits) options.permitted.push_back(parsePermittedName(p).value());
  auto ca = LocalCa::create(options);
  EXPECT_TRUE(ca.ok()) << (ca.ok() ? "" : ca.error().message);
  return std::move(ca.value());
}

X509Ptr mint(const LocalCa& ca, EVP_PKEY* key, const std::string& host) {
  LocalCa::LeafOptions options;
  options.now = kNow;
  auto leaf = ca.signLeaf(parseLeafHost(host).value(), key, options);
  EXPECT_TRUE(leaf.ok()) << (leaf.ok() ? "" : leaf.error().message);
  return std::move(leaf.value());
}

int verifyFor(const LocalCa& ca, EVP_PKEY* key, const std::string& host) {
  auto leaf = mint(ca, key, host);
  int rc = verifyLeaf(ca.certificate(), leaf.get(), host, kNow);
  ERR_clear_error();
  return rc;
}

bool criticalExtension(X509* cert, int nid) {
  int index = X509_get_ext_by_NID(cert, nid, -1);
  return index >= 0 && X509_EXTENSION_get_critical(X509_get_ext(cert, index)) == 1;
}

TEST(LocalCa, IsACaWithAP256Key) {
  LocalCa ca = makeCa();
  X509* cert = ca.certificate();
  EXPECT_GE(X509_check_ca(cert), 1);
  auto* bc = static_cast<BASIC_CONSTRAINTS*>(
      X509_get_ext_d2i(cert, NID_basic_constraints, nullptr, nullptr));
  ASSERT_NE(bc, nullptr);
  EXPECT_TRUE(bc->ca);
  BASIC_CONSTRAINTS_free(bc);
  EXPECT_TRUE(criticalExtension(cert, NID_basic_constraints));
  EXPECT_TRUE(criticalExtension(cert, NID_key_usage));
  uint32_t usage = X509_get_key_usage(cert);
  EXPECT_TRUE(usage & KU_KEY_CERT_SIGN);
  EXPECT_TRUE(usage & KU_CRL_SIGN);
  EXPECT_EQ(X509_verify(cert, ca.key()), 1);  // self-signed
  char group[64] = {};
  ASSERT_EQ(EVP_PKEY_get_group_name(ca.key(), group, sizeof group, nullptr), 1);
  EXPECT_STREQ(group, "prime256v1");
  EXPECT_LT(X509_get_ext_by_NID(cert, NID_name_constraints, -1), 0);  // none asked for
}

TEST(LocalCa, LeafForADnsNameVerifiesWithTheRightShape) {
  LocalCa ca = makeCa();
  auto key = generateP256Key();
  ASSERT_TRUE(key.ok());
  auto leaf = mint(ca, key->get(), "API.Example.com.");
  EXPECT_EQ(verifyLeaf(ca.certificate(), leaf.get(), "api.example.com", kNow), X509_V_OK);
  EXPECT_NE(verifyLeaf(ca.certificate(), leaf.get(), "other.example.com", kNow), X509_V_OK);
  ERR_clear_error();

  auto* names = static_cast<GENERAL_NAMES*>(
      X509_get_ext_d2i(leaf.get(), NID_subject_alt_name, nullptr, nullptr));
  ASSERT_NE(names, nullptr);
  ASSERT_EQ(sk_GENERAL_NAME_num(names), 1);
  const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, 0);
  ASSERT_EQ(name->type, GEN_DNS);
  EXPECT_EQ(std::string(reinterpret_cast<const char*>(name->d.dNSName->data),
                        static_cast<size_t>(name->d.dNSName->length)),
            "api.example.com");
  GENERAL_NAMES_free(names);

  EXPECT_EQ(X509_check_ca(leaf.get()), 0);
  EXPECT_TRUE(X509_get_extended_key_usage(leaf.get()) & XKU_SSL_SERVER);
  int days = 0, seconds = 0;
  ASSERT_EQ(ASN1_TIME_diff(&days, &seconds, X509_get0_notBefore(leaf.get()),
                           X509_get0_notAfter(leaf.get())),
            1);
  EXPECT_LE(days * 86400 + seconds, 25 * 3600);
  EXPECT_EQ(ASN1_TIME_cmp_time_t(X509_get0_notBefore(leaf.get()), CertClock::to_time_t(kNow - 1h)),
            0);
  // Expired a day and a bit later.
  EXPECT_EQ(verifyLeaf(ca.certificate(), leaf.get(), "api.example.com", kNow + 25h),
            X509_V_ERR_CERT_HAS_EXPIRED);
  ERR_clear_error();
}

TEST(LocalCa, LeafForIpLiteralsVerifies) {
  LocalCa ca = makeCa();
  auto key = generateP256Key();
  ASSERT_TRUE(key.ok());
  for (std::string host : {"127.0.0.1", "::1", "[2001:db8::0:1]"}) {
    auto parsed = parseLeafHost(host);
    ASSERT_TRUE(parsed.ok()) << host;
    auto leaf = mint(ca, key->get(), host);
    EXPECT_EQ(verifyLeaf(ca.certificate(), leaf.get(), parsed->name, kNow), X509_V_OK) << host;
    auto* names = static_cast<GENERAL_NAMES*>(
        X509_get_ext_d2i(leaf.get(), NID_subject_alt_name, nullptr, nullptr));
    ASSERT_NE(names, nullptr);
    ASSERT_EQ(sk_GENERAL_NAME_num(names), 1);
    const GENERAL_NAME* name = sk_GENERAL_NAME_value(names, 0);
    EXPECT_EQ(name->type, GEN_IPADD);
    EXPECT_EQ(static_cast<size_t>(name->d.iPAddress->length), parsed->ipBytes.size());
    GENERAL_NAMES_free(names);
  }
  EXPECT_EQ(parseLeafHost("[2001:db8::0:1]")->name, "2001:db8::1");
}

TEST(LocalCa, SerialsAreRandomAnd128Bits) {
  LocalCa ca = makeCa();
  auto key = generateP256Key();
  ASSERT_TRUE(key.ok());
  auto a = mint(ca, key->get(), "a.example");
  auto b = mint(ca, key->get(), "a.example");
  EXPECT_NE(ASN1_INTEGER_cmp(X509_get_serialNumber(a.get()), X509_get_serialNumber(b.get())), 0);
  BIGNUM* bn = ASN1_INTEGER_to_BN(X509_get_serialNumber(a.get()), nullptr);
  EXPECT_GT(BN_num_bits(bn), 64);
  EXPECT_LE(BN_num_bits(bn), 128);
  BN_free(bn);
}

TEST(LocalCa, DnsNameConstraintsArePresentAndEnforced) {
  LocalCa ca = makeCa({"example.com", ".internal"});
  EXPECT_TRUE(criticalExtension(ca.certificate(), NID_name_constraints));
  auto key = generateP256Key();
  ASSERT_TRUE(key.ok());
  for (std::string ok : {"example.com", "api.example.com", "a.b.internal"}) {
    EXPECT_EQ(verifyFor(ca, key->get(), ok), X509_V_OK) << ok;
    EXPECT_TRUE(ca.permits(parseLeafHost(ok).value())) << ok;
  }
  for (std::string bad : {"evil.com", "notexample.com", "internal", "example.com.evil.org"}) {
    EXPECT_EQ(verifyFor(ca, key->get(), bad), X509_V_ERR_PERMITTED_VIOLATION) << bad;
    EXPECT_FALSE(ca.permits(parseLeafHost(bad).value())) << bad;
  }
  // Only DNS names were permitted: every IP address is excluded.
  for (std::string ip : {"127.0.0.1", "::1"}) {
    EXPECT_EQ(verifyFor(ca, key->get(), ip), X509_V_ERR_EXCLUDED_VIOLATION) << ip;
    EXPECT_FALSE(ca.permits(parseLeafHost(ip).value())) << ip;
  }
}

TEST(LocalCa, IpNameConstraintsAreEnforced) {
  LocalCa ca = makeCa({"10.0.0.0/8", "fd00::/8", "tools.local"});
  auto key = generateP256Key();
  ASSERT_TRUE(key.ok());
  for (std::string ok : {"10.1.2.3", "fd12::5", "tools.local"}) {
    EXPECT_EQ(verifyFor(ca, key->get(), ok), X509_V_OK) << ok;
    EXPECT_TRUE(ca.permits(parseLeafHost(ok).value())) << ok;
  }
  for (std::string bad : {"11.0.0.1", "::1", "other.local"}) {
    EXPECT_EQ(verifyFor(ca, key->get(), bad), X509_V_ERR_PERMITTED_VIOLATION) << bad;
    EXPECT_FALSE(ca.permits(parseLeafHost(bad).value())) << bad;
  }
  // Only addresses permitted: every DNS name is excluded.
  LocalCa ipOnly = makeCa({"127.0.0.1"});
  EXPECT_EQ(verifyFor(ipOnly, key->get(), "127.0.0.1"), X509_V_OK);
  EXPECT_EQ(verifyFor(ipOnly, key->get(), "localhost"), X509_V_ERR_EXCLUDED_VIOLATION);
  EXPECT_FALSE(ipOnly.permits(parseLeafHost("localhost").value()));
}

TEST(LocalCa, HostAndPermitParsing) {
  EXPECT_EQ(parseLeafHost("Example.COM.")->name, "example.com");
  EXPECT_EQ(parseLeafHost("my_host-1.svc")->name, "my_host-1.svc");
  for (std::string bad : std::vector<std::string>{
           "", ".", "a..b", "-a.com", "a-.com", "a b", "a,DNS:evil.com", "*.example.com",
           "[1.2.3.4]", "x/y", std::string(64, 'a') + ".com", std::string(254, 'a')})
    EXPECT_FALSE(parseLeafHost(bad).ok()) << bad;
  EXPECT_EQ(parsePermittedName("Example.com")->dns, "example.com");
  EXPECT_EQ(parsePermittedName(".internal")->dns, ".internal");
  EXPECT_EQ(parsePermittedName("10.1.2.3/8")->text(), "10.0.0.0/8");
  EXPECT_EQ(parsePermittedName("::1")->text(), "::1/128");
  for (std::string bad : {"", ".", "10.0.0.0/33", "10.0.0.0/", "a b", "*.x.com", "::/129"})
    EXPECT_FALSE(parsePermittedName(bad).ok()) << bad;
}

// A leaf never outlives its CA: the CA's end cuts it short.
TEST(LocalCa, ALeafEndsNoLaterThanItsCa) {
  LocalCa::Options options;
  options.now = kNow;
  options.validity = std::chrono::hours(2);
  auto ca = LocalCa::create(options);
  ASSERT_TRUE(ca.ok());
  auto key = generateP256Key();
  ASSERT_TRUE(key.ok());
  auto leaf = mint(ca.value(), key->get(), "api.example.com");
  EXPECT_EQ(ASN1_TIME_cmp_time_t(X509_get0_notAfter(leaf.get()), CertClock::to_time_t(kNow + 2h)),
            0);
}

class LocalCaFiles : public ::testing::Test {
 protected:
  void SetUp() override {
    root_ = std::filesystem::temp_directory_path() /
            ("tollgate-ca-test-" + std::to_string(::getpid()) + "-" +
             ::testing::UnitTest::GetInstance()->current_test_info()->name());
    std::filesystem::remove_all(root_);
    std::filesystem::create_directories(root_);
  }
  void TearDown() override { std::filesystem::remove_all(root_); }
  static mode_t modeOf(const std::filesystem::path& p) {
    struct stat st;
    EXPECT_EQ(::stat(p.c_str(), &st), 0) << p;
    return st.st_mode & 07777;
  }
  std::filesystem::path root_;
};

TEST_F(LocalCaFiles, WritesWithSafePermissionsAndLoadsBack) {
  auto dir = root_ / "ca";
  ::umask(0);  // the modes must not depend on the caller's umask
  LocalCa ca = makeCa({"example.com", "10.0.0.0/8"}, CertClock::now());  // valid now: load checks
  ASSERT_TRUE(ca.write(dir, false).ok());
  ::umask(022);
  EXPECT_EQ(modeOf(dir), 0700u);
  EXPECT_EQ(modeOf(dir / "ca.key"), 0600u);
  EXPECT_EQ(modeOf(dir / "ca.crt"), 0644u);
  EXPECT_FALSE(std::filesystem::exists(dir / "ca.key.tmp"));

  auto loaded = LocalCa::load(dir);
  ASSERT_TRUE(loaded.ok()) << loaded.error().message;
  EXPECT_EQ(X509_cmp(loaded->certificate(), ca.certificate()), 0);
  EXPECT_EQ(EVP_PKEY_eq(loaded->key(), ca.key()), 1);
  ASSERT_EQ(loaded->permitted().size(), 2u);
  EXPECT_TRUE(loaded->permits(parseLeafHost("api.example.com").value()));
  EXPECT_TRUE(loaded->permits(parseLeafHost("10.9.9.9").value()));
  EXPECT_FALSE(loaded->permits(parseLeafHost("evil.com").value()));
}

TEST_F(LocalCaFiles, RefusesToOverwriteWithoutForce) {
  auto dir = root_ / "ca";
  LocalCa first = makeCa({}, CertClock::now());
  ASSERT_TRUE(first.write(dir, false).ok());
  LocalCa second = makeCa({}, CertClock::now());
  auto refused = second.write(dir, false);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.error().message.find("already holds a CA"), std::string::npos);
  EXPECT_EQ(X509_cmp(LocalCa::load(dir)->certificate(), first.certificate()), 0);
  ASSERT_TRUE(second.write(dir, true).ok());
  EXPECT_EQ(X509_cmp(LocalCa::load(dir)->certificate(), second.certificate()), 0);
}

// A CA outside its validity would have every leaf refused by the agents: load says so.
TEST_F(LocalCaFiles, LoadRefusesACaOutsideItsValidity) {
  LocalCa::Options old;
  old.now = CertClock::now() - std::chrono::hours(48);
  old.validity = std::chrono::hours(24);
  ASSERT_TRUE(LocalCa::create(old)->write(root_ / "old", false).ok());
  auto expired = LocalCa::load(root_ / "old");
  ASSERT_FALSE(expired.ok());
  EXPECT_NE(expired.error().message.find("expired on"), std::string::npos)
      << expired.error().message;
  LocalCa::Options future;
  future.now = CertClock::now() + std::chrono::hours(48);
  ASSERT_TRUE(LocalCa::create(future)->write(root_ / "future", false).ok());
  auto early = LocalCa::load(root_ / "future");
  ASSERT_FALSE(early.ok());
  EXPECT_NE(early.error().message.find("is not valid before"), std::string::npos)
      << early.error().message;
}

TEST_F(LocalCaFiles, LoadRejectsAMismatchedKey) {
  // CAs valid now, so that the key is the only thing wrong with `a`.
  auto a = root_ / "a", b = root_ / "b";
  ASSERT_TRUE(makeCa({}, CertClock::now()).write(a, false).ok());
  ASSERT_TRUE(makeCa({}, CertClock::now()).write(b, false).ok());
  ASSERT_TRUE(LocalCa::load(a).ok());
  std::filesystem::copy_file(b / "ca.key", a / "ca.key",
                             std::filesystem::copy_options::overwrite_existing);
  auto loaded = LocalCa::load(a);
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.error().message.find("does not belong to"), std::string::npos)
      << loaded.error().message;
  EXPECT_FALSE(LocalCa::load(root_ / "missing").ok());
}

}  // namespace
}  // namespace tollgate
