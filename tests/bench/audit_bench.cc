// Audit stream throughput: records per second through FileAuditSink with group commit and
// fsync, on the disk the log directory is on, from THREADS appending threads (the proxy's
// workers). Each record is a call record of the size the proxy writes. Prints records/s,
// batches (fsyncs) and their mean size, the fsync time, and the process CPU per record;
// then the cost of building records alone (AuditChain, no I/O) for comparison.
//
//   audit_bench [--dir DIR] [--records N] [--threads T] [--sync-us U] [--prefill BYTES]
//               [--direct 0|1]
// DIR defaults to a new directory under /var/tmp (a real disk, not tmpfs); it is removed.
#include <sys/resource.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>
#include <thread>
#include <vector>

#include "audit/chain.h"
#include "audit/file_sink.h"

namespace {

using Clock = std::chrono::steady_clock;

double cpuSeconds() {
  rusage ru{};
  getrusage(RUSAGE_SELF, &ru);
  return static_cast<double>(ru.ru_utime.tv_sec + ru.ru_stime.tv_sec) +
         static_cast<double>(ru.ru_utime.tv_usec + ru.ru_stime.tv_usec) / 1e6;
}

tollgate::AuditRecord sampleRecord(uint64_t i) {
  tollgate::AuditRecord r;
  r.kind = "call";
  r.agent = "agent-" + std::to_string(i % 64);
  r.tool = "notes.write";
  r.method = "POST";
  r.authority = "notes.internal.example:443";
  r.path = "/v1/notes/" + std::to_string(i) + "?fields=title,body";
  r.decision = "allow";
  r.rule = "allow-notes";
  r.reason = "matched rule allow-notes";
  r.policyDigest = "sha256:9f2c4e8a7b1d3f5e6a0c2b4d6f8e1a3c5b7d9f0e2a4c6b8d0f1e3a5c7b9d1f2e";
  return r;
}

struct Counter : tollgate::AuditObserver {
  std::atomic<uint64_t> batches{0}, records{0};
  std::atomic<double> fsync{0}, fsyncMax{0};
  void onBatch(size_t n, double seconds, bool ok) override {
    if (!ok) return;
    batches.fetch_add(1);
    records.fetch_add(n);
    fsync.store(fsync.load() + seconds);  // one writer thread: no lost update
    if (seconds > fsyncMax.load()) fsyncMax.store(seconds);
  }
};

}  // namespace

int main(int argc, char** argv) {
  std::string dir;
  uint64_t records = 200'000;
  unsigned threads = 2;
  long syncUs = 0;  // the sidecar's default: no cap
  uint64_t prefill = 1ull << 20;
  bool direct = true;
  for (int i = 1; i + 1 < argc; i += 2) {
    std::string a = argv[i];
    if (a == "--dir")
      dir = argv[i + 1];
    else if (a == "--records")
      records = std::strtoull(argv[i + 1], nullptr, 10);
    else if (a == "--threads")
      threads = static_cast<unsigned>(std::atoi(argv[i + 1]));
    else if (a == "--sync-us")
      syncUs = std::atol(argv[i + 1]);
    else if (a == "--prefill")
      prefill = std::strtoull(argv[i + 1], nullptr, 10);
    else if (a == "--direct")
      direct = std::string(argv[i + 1]) != "0";
    else {
      std::fprintf(stderr,
                   "usage: audit_bench [--dir DIR] [--records N] [--threads T] [--sync-us U] "
                   "[--prefill BYTES] [--direct 0|1]\n");
      return 2;
    }
  }
  bool ownDir = dir.empty();
  if (ownDir) {
    char tmpl[] = "/var/tmp/tollgate-audit-bench.XXXXXX";
    if (!mkdtemp(tmpl)) return 2;
    dir = tmpl;
  }

  {
    tollgate::FileAuditSink::Options options;
    options.dir = dir + "/log";
    options.syncInterval = std::chrono::microseconds(syncUs);
    options.prefill = prefill;
    options.directIo = direct;
    auto sink = tollgate::FileAuditSink::open(options);
    if (!sink) {
      std::fprintf(stderr, "audit_bench: %s\n", sink.error().message.c_str());
      return 1;
    }
    Counter counter;
    sink.value()->setObserver(&counter);
    std::vector<tollgate::AuditRecord> samples;
    for (uint64_t i = 0; i < 1024; ++i) samples.push_back(sampleRecord(i));

    double cpu0 = cpuSeconds();
    auto t0 = Clock::now();
    std::atomic<uint64_t> last{0};
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < threads; ++t) {
      ts.emplace_back([&, t] {
        uint64_t mine = records / threads + (t < records % threads ? 1 : 0);
        for (uint64_t i = 0; i < mine; ++i) {
          uint64_t seq = sink.value()->append(samples[(i * threads + t) % samples.size()]);
          uint64_t prev = last.load();
          while (seq > prev && !last.compare_exchange_weak(prev, seq)) {
          }
        }
      });
    }
    for (auto& t : ts) t.join();
    while (sink.value()->durableSeq() < last.load() && sink.value()->healthy())
      std::this_thread::sleep_for(std::chrono::microseconds(100));
    double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
    double cpu = cpuSeconds() - cpu0;
    sink.value()->setObserver(nullptr);

    // One record at a time: what a lone call waits for before it is forwarded.
    std::vector<double> waits;
    for (int i = 0; i < 300; ++i) {
      auto w0 = Clock::now();
      tollgate::AuditRecord r = samples[static_cast<size_t>(i) % samples.size()];
      r.sync = tollgate::AuditSync::kNow;  // as the proxy appends an allowed call's record
      uint64_t seq = sink.value()->append(std::move(r));
      while (sink.value()->durableSeq() < seq && sink.value()->healthy()) std::this_thread::yield();
      waits.push_back(std::chrono::duration<double>(Clock::now() - w0).count() * 1e6);
    }
    std::sort(waits.begin(), waits.end());
    uint64_t batches = counter.batches.load();
    std::printf("durable stream: %llu records from %u threads in %.3f s: %.0f records/s\n",
                static_cast<unsigned long long>(records), threads, seconds, records / seconds);
    std::printf(
        "  %llu group commits (fsyncs), %.1f records each; fsync mean %.0f us, max %.0f us\n",
        static_cast<unsigned long long>(batches),
        batches ? static_cast<double>(counter.records.load()) / batches : 0.0,
        batches ? counter.fsync.load() / batches * 1e6 : 0.0, counter.fsyncMax.load() * 1e6);
    std::printf("  process CPU %.2f us per record (appending threads + writer)\n",
                cpu / records * 1e6);
    std::printf("one record at a time: durable after p50 %.0f us, p99 %.0f us\n",
                waits[waits.size() / 2], waits[waits.size() * 99 / 100]);
  }

  // Building records alone: the chain (canonical line, prev hash, Merkle leaf), no I/O.
  tollgate::AuditChain chain("0123456789abcdef0123456789abcdef");
  auto r = sampleRecord(7);
  uint64_t n = std::min<uint64_t>(records, 200'000);
  double cpu0 = cpuSeconds();
  auto t0 = Clock::now();
  size_t bytes = 0;
  for (uint64_t i = 0; i < n; ++i) {
    bytes +=
        chain.appendStrings("call", r.fields(), 1'700'000'000'000'000'000 + static_cast<int64_t>(i))
            .size();
  }
  double seconds = std::chrono::duration<double>(Clock::now() - t0).count();
  std::printf("chain only: %.0f records/s, %.2f us CPU per record, %.0f bytes per record\n",
              n / seconds, (cpuSeconds() - cpu0) / n * 1e6, static_cast<double>(bytes) / n);

  if (ownDir) std::filesystem::remove_all(dir);
  return 0;
}
