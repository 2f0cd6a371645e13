#include "audit/canonical_json.h"

#include <nlohmann/json.hpp>

#include <set>
#include <vector>

namespace tollgate {
namespace {

using Json = nlohmann::json;

// Builds the document while refusing what canonical JSON does not allow, which the DOM
// parser would accept silently (a later duplicate key wins, floats are numbers).
class Strict : public nlohmann::json_sax<Json> {
 public:
  explicit Strict(size_t maxDepth) : maxDepth_(maxDepth) {}

  bool null() override { return put(nullptr); }
  bool boolean(bool v) override { return put(v); }
  bool number_integer(number_integer_t v) override { return put(v); }
  bool number_unsigned(number_unsigned_t v) override { return put(v); }
  bool number_float(number_float_t, const string_t& text) override {
    return fail("not an integer: " + text);
  }
  bool string(string_t& v) override { return put(std::move(v)); }
  bool binary(binary_t&) override { return fail("binary values are not JSON"); }
  bool start_object(std::size_t) override { return open(Json::object()); }
  bool key(string_t& k) override {
    if (!keys_.back().insert(k).second) return fail("duplicate key \"" + k + "\"");
    key_ = std::move(k);
    return true;
  }
  bool end_object() override { return close(); }
  bool start_array(std::size_t) override { return open(Json::array()); }
  bool end_array() override { return close(); }
  bool parse_error(std::size_t position, const std::string&,
                   const nlohmann::detail::exception& ex) override {
    if (error_.empty()) {
      std::string what = ex.what();
      error_ = what.find("UTF-8") != std::string::npos || what.find("utf-8") != std::string::npos
                   ? "invalid UTF-8 at byte " + std::to_string(position)
                   : what;
    }
    return false;
  }

  Json result;
  std::string error_;

 private:
  bool fail(std::string why) {
    if (error_.empty()) error_ = std::move(why);
    return false;
  }
  bool put(Json v) {
    if (stack_.empty()) {
      result = std::move(v);
      return true;
    }
    Json& top = *stack_.back();
    if (top.is_object())
      top[key_] = std::move(v);
    else
      top.push_back(std::move(v));
    return true;
  }
  bool open(Json container) {
    if (stack_.size() >= maxDepth_)
      return fail("too deep (over " + std::to_string(maxDepth_) + ")");
    Json* slot;
    if (stack_.empty()) {
      result = std::move(container);
      slot = &result;
    } else if (stack_.back()->is_object()) {
      slot = &(*stack_.back())[key_];
      *slot = std::move(container);
    } else {
      stack_.back()->push_back(std::move(container));
      slot = &stack_.back()->back();
    }
    stack_.push_back(slot);
    keys_.emplace_back();
    return true;
  }
  bool close() {
    stack_.pop_back();
    keys_.pop_back();
    return true;
  }

  size_t maxDepth_;
  std::vector<Json*> stack_;
  std::vector<std::set<std::string>> keys_;
  std::string key_;
};

}  // namespace

Result<std::string> canonicalJson(std::string_view json, size_t maxDepth) {
  Strict sax(maxDepth);
  bool ok = Json::sax_parse(json.begin(), json.end(), &sax, nlohmann::detail::input_format_t::json,
                            /*strict=*/true);
  if (!ok || !sax.error_.empty()) {
    return Error{-1, sax.error_.empty() ? std::string("not valid JSON") : sax.error_};
  }
  // std::map objects: keys sorted by byte; dump() adds no whitespace; ensure_ascii off.
  try {
    return sax.result.dump(-1, ' ', false, Json::error_handler_t::strict);
  } catch (const Json::exception& e) {
    return Error{-1, std::string("invalid UTF-8: ") + e.what()};
  }
}

bool isCanonicalJson(std::string_view json) {
  auto c = canonicalJson(json);
  return c && c.value() == json;
}

}  // namespace tollgate
