// Policy evaluation time with 10, 1 000 and 10 000 rules: extraction plus the engine, for
// an allowed call that every rule has to be looked at for (deny-overrides evaluates all).
#include <benchmark/benchmark.h>

#include <string>

#include "policy/engine.h"

namespace tollgate {
namespace {

std::shared_ptr<const PolicySet> makeSet(int rules) {
  std::string text = "apiVersion: tollgate/v1\nkind: Policy\ntools:\n";
  int tools = std::max(1, rules / 10);
  for (int t = 0; t < tools; ++t) {
    text += "  - {name: svc" + std::to_string(t) + ".read, match: {host: svc" + std::to_string(t) +
            ".internal, methods: [GET], paths: [\"/api/**\"]}, class: read}\n";
  }
  text += "rules:\n";
  for (int r = 0; r < rules; ++r) {
    int t = r % tools;
    switch (r % 4) {
      case 0:
        text += "  - {id: r" + std::to_string(r) + ", effect: allow, match: {tool: svc" +
                std::to_string(t) + ".read}}\n";
        break;
      case 1:
        text += "  - {id: r" + std::to_string(r) + ", effect: halt, match: {tool: svc" +
                std::to_string(t) + ".read, agent: \"banned-" + std::to_string(r) + "\"}}\n";
        break;
      case 2:
        text += "  - {id: r" + std::to_string(r) + ", effect: allow, match: {tool: \"svc" +
                std::to_string(t) + ".*\", agent: \"team-" + std::to_string(r) + "-*\"}}\n";
        break;
      default:
        text += "  - {id: r" + std::to_string(r) +
                ", effect: halt, match: {class: write, agent: \"agent-" + std::to_string(r) +
                "\"}}\n";
    }
  }
  return PolicySet::parse(text, "bench.yaml").value();
}

void BM_Decide(benchmark::State& state) {
  auto set = makeSet(static_cast<int>(state.range(0)));
  Engine engine;
  CallInfo c;
  c.agent = "agent-7";
  c.method = "GET";
  c.scheme = "http";
  c.host = "svc0.internal";
  c.port = 80;
  c.target = "/api/items/42?expand=true";
  for (auto _ : state) {
    auto d = engine.evaluate(*set, Extractor::extract(c, *set));
    if (d.verdict != Verdict::kAllow) state.SkipWithError("the call should be allowed");
    benchmark::DoNotOptimize(d);
  }
  state.SetLabel(std::to_string(set->rules().size()) + " rules, " +
                 std::to_string(set->tools().size()) + " tools");
}
BENCHMARK(BM_Decide)->Arg(10)->Arg(1000)->Arg(10000)->Unit(benchmark::kMicrosecond);

}  // namespace
}  // namespace tollgate

BENCHMARK_MAIN();
