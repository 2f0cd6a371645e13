#include "policy/policy_set.h"

#include <gtest/gtest.h>

#include <filesystem>

namespace tollgate {
namespace {

// Every policy below starts with these two lines: its own text begins on line 3.
constexpr const char* kHeader = "apiVersion: tollgate/v1\nkind: Policy\n";

Result<std::shared_ptr<const PolicySet>> parse(const std::string& body) {
  return PolicySet::parse(kHeader + body, "p.yaml");
}

// The error a policy is refused with, or "" when it loads.
std::string errorOf(const std::string& body) {
  auto set = parse(body);
  return set ? "" : set.error().message;
}

TEST(PolicySetLoad, ADuplicateKeyIsRefusedWithItsPlace) {
  // yaml-cpp keeps both entries and the last one wins: this halt used to load as an allow.
  EXPECT_EQ(errorOf("tools: [{name: pay, match: {host: pay.internal}}]\n"
                    "rules:\n"
                    "  - {id: refunds, effect: halt, match: {tool: pay}, effect: allow}\n"),
            "p.yaml:5:53: rules[0].effect: duplicate key");
  EXPECT_EQ(errorOf("limits: {max_body_bytes: 1m}\nlimits: {max_body_bytes: 1k}\n"),
            "p.yaml:4:1: limits: duplicate key");
  EXPECT_EQ(errorOf("rules:\n"
                    "  - id: r\n"
                    "    effect: allow\n"
                    "    match: {host: a.example}\n"
                    "    when: {params.x: {lte: 5}, params.x: {gte: 500}}\n"),
            "p.yaml:7:32: rules[0].when.params.x: duplicate key");
  EXPECT_EQ(errorOf("rules:\n"
                    "  - id: r\n"
                    "    effect: allow\n"
                    "    match: {host: a.example}\n"
                    "    when: {params.x: {lte: 5, lte: 500}}\n"),
            "p.yaml:7:31: rules[0].when.params.x.lte: duplicate key");
}

TEST(PolicySetLoad, TwoSpellingsOfOneKeyAreADuplicate) {
  // Each spelling replaced the other's list: this halt used to cover PUT alone.
  EXPECT_EQ(errorOf("rules:\n"
                    "  - {id: r, effect: halt, match: {host: a.example, methods: [DELETE], "
                    "method: PUT}}\n"),
            "p.yaml:4:71: rules[0].match.method: duplicate key (methods and method are one key)");
  EXPECT_EQ(errorOf("agents: [{id: a, neighbors: [b], neighbours: [c]}]\n"),
            "p.yaml:3:34: agents[0].neighbours: duplicate key (neighbors and neighbours are one "
            "key)");
  // Spellings that add to each other (host and hosts, path and paths) stay allowed.
  EXPECT_EQ(errorOf("tools: [{name: t, match: {host: a.example, hosts: [b.example]}}]\n"), "");
}

TEST(PolicySetLoad, BodyLimitsAreBounded) {
  // 0 read no body, so params conditions never held: a halt on params did nothing.
  EXPECT_EQ(errorOf("limits: {max_body_bytes: 0}\n"),
            "p.yaml:3:26: limits.max_body_bytes: must be from 1 to 64m");
  EXPECT_EQ(errorOf("limits: {max_body_bytes: 65m}\n"),
            "p.yaml:3:26: limits.max_body_bytes: must be from 1 to 64m");
  EXPECT_EQ(errorOf("limits: {max_json_depth: 0}\n"),
            "p.yaml:3:26: limits.max_json_depth: must be from 1 to 256");
  EXPECT_EQ(errorOf("limits: {max_json_keys: 0}\n"),
            "p.yaml:3:25: limits.max_json_keys: must be from 1 to 1000000");
  auto set = parse("limits: {max_body_bytes: 64m}\n");
  ASSERT_TRUE(set) << set.error().message;
  EXPECT_EQ(set.value()->maxBodyBytes(), 64u << 20);
}

TEST(PolicySetLoad, ADirectoryIsNoPolicyFile) {
  // It opens and reads as nothing: it used to load as an empty set (every call halted).
  auto dir = std::filesystem::temp_directory_path() / "tollgate-policy-dir-test";
  std::filesystem::create_directories(dir);
  auto set = PolicySet::load({dir.string()});
  std::filesystem::remove(dir);
  ASSERT_FALSE(set);
  EXPECT_EQ(set.error().message, dir.string() + ": is a directory");
}

}  // namespace
}  // namespace tollgate
