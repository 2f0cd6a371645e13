#include "proxy/http_parser.h"

#include <gtest/gtest.h>

#include <string>
#include <vector>

namespace tollgate {
namespace {

// Records what the parser reports, pausing after each message as the proxy does.
struct Recorder : HttpParser::Handler {
  void onMessageBegin(HttpParser&) override { ++begun; }
  int onHeadersComplete(HttpParser& p) override {
    urls.emplace_back(p.head().url());
    return 0;
  }
  int onBody(HttpParser&, std::string_view data) override {
    body.append(data);
    return 0;
  }
  int onMessageComplete(HttpParser& p) override {
    ++completed;
    return p.upgrade() ? 0 : HPE_PAUSED;
  }
  int begun = 0, completed = 0;
  std::vector<std::string> urls;
  std::string body;
};

HttpParser::Limits limits() {
  return {1024, 10, 128};
}

TEST(HttpParser, ParsesHeadAndChunkedBody) {
  Recorder r;
  auto l = limits();
  HttpParser p(HttpParser::Type::kRequest, l, r);
  std::string req =
      "POST http://a.example/x HTTP/1.1\r\nHost: a.example\r\nX-Y: 1\r\n"
      "Transfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n";
  auto out = p.execute(req);
  EXPECT_EQ(out.state, HttpParser::State::kPaused);
  EXPECT_EQ(out.consumed, req.size());
  EXPECT_EQ(r.body, "abcde");
  EXPECT_TRUE(p.chunked());
  EXPECT_EQ(p.head().find("x-y").value_or(""), "1");
  EXPECT_EQ(p.head().count("HOST"), 1u);
}

TEST(HttpParser, PausesBetweenPipelinedRequests) {
  Recorder r;
  auto l = limits();
  HttpParser p(HttpParser::Type::kRequest, l, r);
  std::string one = "GET /1 HTTP/1.1\r\nHost: a\r\n\r\n";
  std::string two = "GET /2 HTTP/1.1\r\nHost: a\r\n\r\n";
  auto out = p.execute(one + two);
  EXPECT_EQ(out.state, HttpParser::State::kPaused);
  EXPECT_EQ(out.consumed, one.size());
  p.resume();
  out = p.execute(two);
  EXPECT_EQ(out.state, HttpParser::State::kPaused);
  EXPECT_EQ(r.urls, (std::vector<std::string>{"/1", "/2"}));
}

TEST(HttpParser, HeaderLimitsGiveTheirStatus) {
  Recorder r;
  auto l = limits();
  {
    HttpParser p(HttpParser::Type::kRequest, l, r);
    std::string req = "GET /" + std::string(200, 'a') + " HTTP/1.1\r\n\r\n";
    EXPECT_EQ(p.execute(req).state, HttpParser::State::kError);
    EXPECT_EQ(p.errorStatus(), 414);
  }
  {
    HttpParser p(HttpParser::Type::kRequest, l, r);
    std::string req = "GET / HTTP/1.1\r\n";
    for (int i = 0; i < 11; ++i) req += "X-" + std::to_string(i) + ": v\r\n";
    EXPECT_EQ(p.execute(req + "\r\n").state, HttpParser::State::kError);
    EXPECT_EQ(p.errorStatus(), 431);
  }
  {
    HttpParser p(HttpParser::Type::kRequest, l, r);
    std::string req = "GET / HTTP/1.1\r\nX: " + std::string(1100, 'v') + "\r\n\r\n";
    EXPECT_EQ(p.execute(req).state, HttpParser::State::kError);
    EXPECT_EQ(p.errorStatus(), 431);
  }
}

// Strict mode turns smuggling-shaped requests into errors (the proxy answers 400).
TEST(HttpParser, RejectsSmugglingShapes) {
  const char* cases[] = {
      "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: "
      "chunked\r\n\r\n0\r\n\r\n",
      "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
      "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 12a\r\n\r\n",
      "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
      "GET / HTTP/1.1\r\nHost: a\r\nX: a\x01"
      "b\r\n\r\n",
      "GET / HTTP/1.1\r\nHost : a\r\n\r\n",
      "GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n",
      "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
  };
  for (const char* c : cases) {
    Recorder r;
    auto l = limits();
    HttpParser p(HttpParser::Type::kRequest, l, r);
    EXPECT_EQ(p.execute(c).state, HttpParser::State::kError) << c;
    EXPECT_EQ(p.errorStatus(), 400) << c;
  }
}

TEST(HttpParser, EmptyValuesAndSplitValuesAreNotFolds) {
  Recorder r;
  auto l = limits();
  HttpParser p(HttpParser::Type::kRequest, l, r);
  std::string req = "GET / HTTP/1.1\r\nHost: a\r\nX-Empty:\r\nX-Split: one two\r\n\r\n";
  // Feed byte by byte: every value arrives in pieces, none of them folded.
  for (size_t i = 0; i < req.size(); ++i) {
    auto out = p.execute(std::string_view(req).substr(i, 1));
    ASSERT_NE(out.state, HttpParser::State::kError) << "at byte " << i << ": " << p.errorReason();
  }
  EXPECT_EQ(p.head().find("x-empty").value_or("missing"), "");
  EXPECT_EQ(p.head().find("x-split").value_or(""), "one two");
  EXPECT_EQ(p.head().size(), 3u);
}

TEST(HttpParser, FoldSplitAcrossReadsIsStillAFold) {
  Recorder r;
  auto l = limits();
  HttpParser p(HttpParser::Type::kRequest, l, r);
  EXPECT_NE(p.execute("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n").state, HttpParser::State::kError);
  EXPECT_EQ(p.execute(" b\r\n\r\n").state, HttpParser::State::kError);
  EXPECT_EQ(p.errorStatus(), 400);
}

// llhttp hands the folded line of an empty value (`X:\r\n b`) to on_header_value as the
// value's first bytes: still a fold, in one read or split anywhere.
TEST(HttpParser, AFoldAfterAnEmptyValueIsAFold) {
  for (std::string fold : {"X-A:\r\n b\r\n", "X-A: \r\n b\r\n", "X-A:\r\n\tb\r\n"}) {
    std::string req = "GET / HTTP/1.1\r\nHost: a\r\n" + fold + "\r\n";
    for (size_t split = 0; split < req.size(); ++split) {
      Recorder r;
      auto l = limits();
      HttpParser p(HttpParser::Type::kRequest, l, r);
      auto first = p.execute(std::string_view(req).substr(0, split));
      bool failed =
          first.state == HttpParser::State::kError ||
          p.execute(std::string_view(req).substr(split)).state == HttpParser::State::kError;
      EXPECT_TRUE(failed) << "split at " << split << ": " << req;
      EXPECT_EQ(p.errorStatus(), 400) << "split at " << split;
    }
  }
  // Byte by byte, too.
  Recorder r;
  auto l = limits();
  HttpParser p(HttpParser::Type::kRequest, l, r);
  std::string req = "GET / HTTP/1.1\r\nHost: a\r\nX-A:  \r\n  b\r\n\r\n";
  bool failed = false;
  for (size_t i = 0; i < req.size() && !failed; ++i)
    failed = p.execute(std::string_view(req).substr(i, 1)).state == HttpParser::State::kError;
  EXPECT_TRUE(failed);
}

TEST(HttpParser, ResponsesKeepTheirStatus) {
  Recorder r;
  auto l = limits();
  HttpParser p(HttpParser::Type::kResponse, l, r);
  auto out = p.execute("HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok");
  EXPECT_EQ(out.state, HttpParser::State::kPaused);
  EXPECT_EQ(p.head().status, 201);
  EXPECT_EQ(r.body, "ok");
  EXPECT_TRUE(p.keepAlive());
}

}  // namespace
}  // namespace tollgate
