#include "certs/certs_cli.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <filesystem>
#include <memory>
#include <string>

#include "certs/leaf_cache.h"
#include "certs/local_ca.h"
#include "common/files.h"

namespace tollgate {
namespace {

int usageError(std::FILE* err, const std::string& message) {
  std::fprintf(err, "tollgate: %s (see 'tollgate help')\n", message.c_str());
  return 2;
}

std::string absolutePath(const std::string& path) {
  std::error_code ec;
  auto abs = std::filesystem::absolute(path, ec);
  return ec ? path : abs.lexically_normal().string();
}

void printTrustHelp(std::FILE* out, const std::string& certPath) {
  const char* c = certPath.c_str();
  std::fprintf(
      out,
      "\nmake agents trust it (only agents whose TLS the sidecar intercepts need this):\n"
      "  export SSL_CERT_FILE=%s        # OpenSSL-based clients: curl, Python ssl\n"
      "  export REQUESTS_CA_BUNDLE=%s   # Python requests, httpx\n"
      "  export NODE_EXTRA_CA_CERTS=%s  # Node.js (added to its built-in list)\n"
      "SSL_CERT_FILE and REQUESTS_CA_BUNDLE replace the default list: when the agent also\n"
      "reaches hosts that are not intercepted (passthrough), give it a bundle of both:\n"
      "  cat /etc/ssl/certs/ca-certificates.crt %s > agent-bundle.pem\n"
      "or trust it system-wide (Debian, Ubuntu):\n"
      "  sudo cp %s /usr/local/share/ca-certificates/tollgate-ca.crt\n"
      "  sudo update-ca-certificates\n",
      c, c, c, c, c);
}

int certsInit(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir;
  bool force = false;
  LocalCa::Options options;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--permit" || args[i] == "--name") {
      if (i + 1 >= args.size()) return usageError(err, std::string(args[i]) + " needs a value");
      std::string_view value = args[++i];
      if (args[i - 1] == "--name") {
        if (value.empty()) return usageError(err, "--name needs a value");
        // X.509's upper bound for a common name (RFC 5280, ub-common-name).
        if (value.size() > 64)
          return usageError(err, "--name: at most 64 characters (a certificate's common name)");
        options.commonName = std::string(value);
        continue;
      }
      auto permitted = parsePermittedName(value);
      if (!permitted) return usageError(err, "--permit: " + permitted.error().message);
      options.permitted.push_back(std::move(permitted.value()));
    } else if (args[i] == "--force") {
      force = true;
    } else if (dir.empty() && !args[i].starts_with("-")) {
      dir = std::string(args[i]);
    } else {
      return usageError(err, "certs init: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (dir.empty()) return usageError(err, "certs init needs a DIR");
  dir = absolutePath(dir);
  // Checked before the key is generated, so a refusal is cheap and says why.
  struct stat st;
  if (!force && (::lstat((dir + "/ca.key").c_str(), &st) == 0 ||
                 ::lstat((dir + "/ca.crt").c_str(), &st) == 0)) {
    std::fprintf(err,
                 "tollgate: %s already holds a CA (ca.key, ca.crt); --force replaces it, and "
                 "agents that trust the old one must then be given the new one\n",
                 dir.c_str());
    return 1;
  }
  auto ca = LocalCa::create(options);
  if (!ca) {
    std::fprintf(err, "tollgate: certs init: %s\n", ca.error().message.c_str());
    return 1;
  }
  if (auto written = ca->write(dir, force); !written) {
    std::fprintf(err, "tollgate: certs init: %s\n", written.error().message.c_str());
    return 1;
  }
  std::string certPath = dir + "/ca.crt";
  std::fprintf(out, "created a local CA in %s (mode 0700)\n", dir.c_str());
  std::fprintf(out, "  certificate  %s (0644): give this one to agents\n", certPath.c_str());
  std::fprintf(out, "  private key  %s/ca.key (0600): keep it secret, it never leaves this host\n",
               dir.c_str());
  std::fprintf(out, "  fingerprint  %s\n", certificateFingerprint(ca->certificate()).c_str());
  if (options.permitted.empty()) {
    std::fprintf(out, "  names        any (no name constraints; --permit limits them)\n");
  } else {
    std::string dns, ip;
    for (const auto& p : options.permitted) {
      std::string& list = p.isIp ? ip : dns;
      list += (list.empty() ? "" : ", ") + p.text();
    }
    std::fprintf(out, "  names        only DNS %s; IP %s (name constraints, critical)\n",
                 dns.empty() ? "none" : dns.c_str(), ip.empty() ? "none" : ip.c_str());
  }
  printTrustHelp(out, certPath);
  return 0;
}

Status writePrivateFile(const std::string& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return Error{-errno, "cannot create " + path + ": " + std::strerror(errno)};
  bool ok = ::fchmod(fd, 0600) == 0 && writeAll(fd, content);
  int saved = errno;
  ::close(fd);
  if (!ok) return Error{-saved, "cannot write " + path + ": " + std::strerror(saved)};
  return Status::success();
}

int certsMint(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  std::string dir, host, keyOut;
  for (size_t i = 0; i < args.size(); ++i) {
    if (args[i] == "--key-out") {
      if (i + 1 >= args.size()) return usageError(err, "--key-out needs a file");
      keyOut = std::string(args[++i]);
    } else if (!args[i].starts_with("-") && dir.empty()) {
      dir = std::string(args[i]);
    } else if (!args[i].starts_with("-") && host.empty()) {
      host = std::string(args[i]);
    } else {
      return usageError(err, "certs mint: unknown argument '" + std::string(args[i]) + "'");
    }
  }
  if (dir.empty() || host.empty()) return usageError(err, "certs mint needs DIR and HOST");
  if (auto parsed = parseLeafHost(host); !parsed)
    return usageError(err, "certs mint: " + parsed.error().message);
  auto ca = LocalCa::load(dir);
  if (!ca) {
    std::fprintf(err, "tollgate: certs mint: %s\n", ca.error().message.c_str());
    return 1;
  }
  // Through the cache, as the sidecar does: the same checks and the same kind of leaf.
  auto cache = LeafCache::create(std::make_shared<const LocalCa>(std::move(ca.value())));
  if (!cache) {
    std::fprintf(err, "tollgate: certs mint: %s\n", cache.error().message.c_str());
    return 1;
  }
  auto leaf = cache.value()->get(host);
  if (!leaf) {
    std::fprintf(err, "tollgate: certs mint: %s\n", leaf.error().message.c_str());
    return 1;
  }
  if (!keyOut.empty()) {
    if (auto st = writePrivateFile(keyOut, privateKeyToPem(leaf.value()->key())); !st) {
      std::fprintf(err, "tollgate: certs mint: %s\n", st.error().message.c_str());
      return 1;
    }
  }
  std::fputs(certificateToPem(leaf.value()->certificate()).c_str(), out);
  return 0;
}

}  // namespace

int certsCommand(const std::vector<std::string_view>& args, std::FILE* out, std::FILE* err) {
  if (args.empty()) return usageError(err, "certs needs init or mint");
  std::vector<std::string_view> rest(args.begin() + 1, args.end());
  if (args[0] == "init") return certsInit(rest, out, err);
  if (args[0] == "mint") return certsMint(rest, out, err);
  return usageError(err, "unknown certs command '" + std::string(args[0]) + "'");
}

}  // namespace tollgate
