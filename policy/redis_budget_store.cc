#include "policy/redis_budget_store.h"

#include <algorithm>
#include <cctype>
#include <map>

#include <hiredis/async.h>
#include <hiredis/hiredis.h>

#include <charconv>

#include "common/log.h"
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include <hiredis/adapters/libuv.h>
#pragma GCC diagnostic pop

namespace tollgate {
namespace {

constexpr size_t kMaxRetries = 10'000;   // per worker loop
constexpr uint64_t kRetryDelayMs = 250;  // an undelivered settlement's next try
constexpr size_t kMaxBatch = 256;        // operations in one script call
constexpr uint64_t kSettleDelayMs = 2;   // a settlement waits this long for a reserve to go with
constexpr size_t kMaxInFlight = 2;  // batch scripts of the same pools on the wire, per worker loop

// KEYS: 6 per pool (b, h, x, d, m, n). ARGV for init and view: op, mode, 0, pool count, then
// per pool: name, effort amount, risk amount, effort limit, effort period ms, risk limit,
// risk period ms. Reserve, settle and release always go in batches (layout at
// `op == 'batch'`).
// Amounts are the estimate for reserve and the real cost for settle (-1: what was held).
// A limit of -1: the policy gives the pool no budget of that dimension. Operations run in
// order, each exactly as it would alone; expired holds are committed first.
const RedisScript& budgetScript() {
  static const RedisScript script(R"LUA(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local op, call = ARGV[1], ARGV[2]
local n = #KEYS / 6
local base = 4  -- init and view: ARGV index before the per-pool values
local DIMS = {'effort', 'risk'}
local GEN = 50000     -- settled call ids per generation: 50 000 to 100 000 remembered per pool
local SWEEP_MS = 1000 -- how often a batch looks for expired holds of other calls
-- The holds' sentinel: a value longer than a listpack takes makes h a hash table for good.
-- As a listpack (up to 128 small fields) every field of an HMGET, HSET or HDEL is found by
-- a scan: a batch's cost grew with the batch times the holds of the pool.
local SENTINEL = '0:0:' .. string.rep('0', 64)

local function I(x) return string.format('%d', x) end
local function num(v) return tonumber(v) or 0 end
local function A(i, k) return ARGV[base + 7 * (i - 1) + 1 + k] end
-- Per pool: b budgets, h holds, x legacy expiries, d the settled ids of older releases (a
-- sorted set: created for them at init, never read here), m and n settled ids (this
-- generation and the last).
local function K(i, k) return KEYS[6 * (i - 1) + k] end

-- A hold is 'effort:risk:expiry' (units; ms of Redis time). Releases before 2026-11-29
-- wrote 'effort:risk' and kept the expiry in the sorted set x: such a hold (expiry false
-- here) expires when x says so, so that older and newer sidecars share a pool exactly
-- during a rolling upgrade. New holds never enter x.
local function parseHold(v)
  local e, r, x = string.match(v, '^([^:]*):([^:]*):(.*)$')
  if e then return {num(e), num(r), num(x)} end
  e, r = string.match(v, '^([^:]*):(.*)$')
  if e then return {num(e), num(r), false} end
  return {num(v), 0, false}
end

-- Holds by their string, parsed once per script (a batch's holds were mostly written by a
-- few batches, with the same amounts and expiry). Shared: never changed.
local holdOf = {}
local function HOLD(v)
  local h = holdOf[v]
  if not h then
    h = parseHold(v)
    holdOf[v] = h
  end
  return h
end

-- Whether a hold has expired; due(): the set of calls whose legacy hold x says is due.
local function isExpired(id, hold, due)
  if hold[3] then return hold[3] <= now end
  return due()[id] == true
end

-- A lazy due() for the legacy holds of the pool whose x key this is.
local function legacyDue(x)
  local set
  return function()
    if not set then
      set = {}
      for _, id in ipairs(redis.call('ZRANGEBYSCORE', x, '-inf', now, 'LIMIT', 0, 10000)) do
        set[id] = true
      end
    end
    return set
  end
end

-- Settled (or expired, or released) call ids: a later reserve of one is refused. They go
-- into the hash m; when it holds GEN of them it becomes n, and the n before is dropped. A
-- hash takes an id in O(1), where a sorted set trimmed by rank paid a skip list's insert,
-- its score's parse and the trim. count: ids in m (the budget's 'marks'); the new count.
local function remember(i, ids, count)
  if #ids == 0 then return count end
  local args = {}
  for x, id in ipairs(ids) do
    args[2 * x - 1] = id
    args[2 * x] = '1'
  end
  count = count + redis.call('HSET', K(i, 5), unpack(args))
  if count >= GEN then
    redis.call('UNLINK', K(i, 6))
    redis.call('RENAME', K(i, 5), K(i, 6))
    redis.call('HSET', K(i, 5), '_', '1')
    count = 0
  end
  return count
end

if op == 'init' then
  local out = {}
  for i = 1, n do
    local b = K(i, 1)
    if call ~= 'reset' and redis.call('EXISTS', b) == 1 then
      out[i] = 'exists'
    else
      redis.call('DEL', b, K(i, 2), K(i, 3), K(i, 5), K(i, 6))
      redis.call('HSET', b, 'created', I(now), 'marks', '0')
      -- Sentinels keep every key of the pool in existence, so that a slot migration moves
      -- them together and a script never sees some keys moved and others not (TRYAGAIN).
      redis.call('HSET', K(i, 2), '_', SENTINEL)
      redis.call('ZADD', K(i, 3), 'inf', '_')
      redis.call('ZADD', K(i, 4), 'inf', '_')
      redis.call('HSET', K(i, 5), '_', '1')
      redis.call('HSET', K(i, 6), '_', '1')
      for j, dim in ipairs(DIMS) do
        local limit, period = tonumber(A(i, 1 + 2 * j)), tonumber(A(i, 2 + 2 * j))
        if limit >= 0 then
          redis.call('HSET', b, dim .. ':committed', '0', dim .. ':held', '0', dim .. ':tripped',
                     '0', dim .. ':period', I(period), dim .. ':start', I(now - now % period))
        end
      end
      out[i] = 'created'
    end
  end
  return out
end

if op == 'view' then
  local out = {}
  for i = 1, n do
    local b, h = K(i, 1), K(i, 2)
    local alive = redis.call('EXISTS', b) == 1
    -- Every expired hold is committed first.
    local all, del, xdel, marks, due = redis.call('HGETALL', h), {}, {}, {}, legacyDue(K(i, 3))
    for x = 1, #all, 2 do
      local hold = HOLD(all[x + 1])
      if all[x] ~= '_' and isExpired(all[x], hold, due) then
        if not hold[3] then xdel[#xdel + 1] = all[x] end
        if alive then
          for j, dim in ipairs(DIMS) do
            if hold[j] > 0 then
              redis.call('HINCRBY', b, dim .. ':held', -hold[j])
              redis.call('HINCRBY', b, dim .. ':committed', hold[j])
            end
          end
        end
        del[#del + 1] = all[x]
        marks[#marks + 1] = all[x]
      end
    end
    if #del > 0 then redis.call('HDEL', h, unpack(del)) end
    if #xdel > 0 then redis.call('ZREM', K(i, 3), unpack(xdel)) end
    if #marks > 0 then
      local count = remember(i, marks, num(redis.call('HGET', b, 'marks')))
      if alive then redis.call('HSET', b, 'marks', I(count)) end
    end
    for j, dim in ipairs(DIMS) do
      local limit, period = tonumber(A(i, 1 + 2 * j)), tonumber(A(i, 2 + 2 * j))
      if limit >= 0 then
        if alive then
          local f = redis.call('HMGET', b, dim .. ':committed', dim .. ':held', dim .. ':period',
                               dim .. ':start', dim .. ':tripped')
          local committed, start, tripped = num(f[1]), num(f[4]), num(f[5])
          if num(f[3]) ~= period then
            start = now - now % period
            redis.call('HSET', b, dim .. ':period', I(period), dim .. ':start', I(start))
          elseif now >= start + period then
            start, committed, tripped = now - now % period, 0, 0
            redis.call('HSET', b, dim .. ':start', I(start), dim .. ':committed', '0',
                       dim .. ':tripped', '0')
          end
          out[#out + 1] = {A(i, 0), dim, 1, committed, num(f[2]), start + period, tripped}
        else
          out[#out + 1] = {A(i, 0), dim, 0, 0, 0, 0, 0}
        end
      end
    end
  end
  return out
end

-- A batch: ARGV[2] operations on the pools of KEYS. ARGV[3…]: per pool its name, effort
-- limit, effort period ms, risk limit, risk period ms; then per operation its call id and
-- its spec, 'OP TTL' (reserve, settle or release; the hold's ttl in ms) and per pool the
-- effort and the risk amount (integers). An answer is 0 for a plain ok, else {status,
-- pool, reason, overrun}. Every key is read once (the pools' budgets, the holds of the
-- batch's calls, the settled marks of those it reserves), the operations run in order on
-- those values in Lua, exactly as each would alone, and what changed is written back once
-- per key. Expired holds are committed first: those of the batch's calls always, the others
-- at most once a second. This runs for every call of every sidecar on Redis's one thread,
-- and its cost is mostly Lua's own: a call's arguments are two strings, specs and holds
-- are parsed once per script and shared, numbers are formatted only where they change.
if op == 'batch' then
  local m = tonumber(ARGV[2])
  local first = 3 + 5 * n  -- the first operation's index
  -- Specs by their string: {op, a[i] = {effort, risk} as given, hold[i] = the hold a reserve
  -- leaves ({effort, risk, expiry, its string})}. A batch's specs are one or two strings.
  local specOf = {}
  local function SPEC(s)
    local sp = specOf[s]
    if sp then return sp end
    local w = {}
    for x in string.gmatch(s, '%S+') do w[#w + 1] = x end
    local until_ = now + num(w[2])
    local xs = I(until_)
    sp = {op = w[1], a = {}, hold = {}}
    for i = 1, n do
      local es, rs = w[1 + 2 * i] or '0', w[2 + 2 * i] or '0'
      local e, r = num(es), num(rs)
      sp.a[i] = {e, r}
      if e <= 0 then e, es = 0, '0' end
      if r <= 0 then r, rs = 0, '0' end
      sp.hold[i] = {e, r, until_, es .. ':' .. rs .. ':' .. xs}
    end
    specOf[s] = sp
    return sp
  end
  -- The batch's call ids, once each (ids; seen[id] is 2 once it is reserved), and those it
  -- reserves (rids).
  local ids, seen, rids = {}, {}, {}
  for at = first, first + 2 * (m - 1), 2 do
    local id = ARGV[at]
    local s = seen[id]
    if not s then
      ids[#ids + 1] = id
      s = 1
      seen[id] = 1
    end
    if s == 1 and SPEC(ARGV[at + 1]).op == 'reserve' then
      rids[#rids + 1] = id
      seen[id] = 2
    end
  end
  -- Per pool: name; limit and period by dimension (1 effort, 2 risk); st[i][j] the stored
  -- budget (st[i] false when the pool is missing); holds[i][id] the calls' live holds and
  -- read[i][id] those read live; the ids to mark settled (marks[i]) and the holds to delete
  -- (dels[i]: expired ones, the batch's and the others' the sweep found); legacy holds to
  -- leave x (xdel), and the batch's live ones (legacy); done[id]: settled, released or
  -- expired (a reserve is refused).
  local name, limit, period, st, holds, read, marks, dels, xdel, legacy, done = {}, {}, {}, {},
      {}, {}, {}, {}, {}, {}, {}
  local function expired(i, hold)  -- committed, not refunded: the call may have run
    local s = st[i]
    if s then
      for j = 1, 2 do
        if hold[j] > 0 then
          s[j].held, s[j].committed, s[j].moved = s[j].held - hold[j], s[j].committed + hold[j], true
        end
      end
    end
  end
  for i = 1, n do
    local o = 3 + 5 * (i - 1)
    name[i] = ARGV[o]
    limit[i] = {tonumber(ARGV[o + 1]), tonumber(ARGV[o + 3])}
    period[i] = {tonumber(ARGV[o + 2]), tonumber(ARGV[o + 4])}
    local v = redis.call('HMGET', K(i, 1), 'created', 'effort:committed', 'effort:held',
                         'effort:period', 'effort:start', 'effort:tripped', 'risk:committed',
                         'risk:held', 'risk:period', 'risk:start', 'risk:tripped', 'swept',
                         'marks')
    local s = false
    if v[1] then
      s = {sweep = now >= num(v[12]) + SWEEP_MS, marks = num(v[13]), unmarked = not v[13]}
      for j = 1, 2 do
        local f = 1 + 5 * (j - 1)
        s[j] = {committed = num(v[f + 1]), held = num(v[f + 2]), period = num(v[f + 3]),
                start = num(v[f + 4]), tripped = num(v[f + 5]), moved = false, rolled = false}
      end
      if not v[13] then
        -- A pool initialised by an older release (no 'marks'): its holds become a hash
        -- table and its marks' keys start now.
        redis.call('HSET', K(i, 2), '_', SENTINEL)
        redis.call('HSET', K(i, 5), '_', '1')
        redis.call('HSET', K(i, 6), '_', '1')
      end
    end
    st[i] = s
    local hs, rd, mk, del, xd, lg, due = {}, {}, {}, {}, {}, {}, nil
    local h = redis.call('HMGET', K(i, 2), unpack(ids))
    for x, id in ipairs(ids) do
      local hv = h[x]
      if hv then
        local hold = HOLD(hv)
        if not hold[3] then due = due or legacyDue(K(i, 3)) end
        if not isExpired(id, hold, due) then
          hs[id], rd[id] = hold, true
          if not hold[3] then lg[id] = true end
        else
          expired(i, hold)
          mk[#mk + 1], del[#del + 1], done[id] = id, id, true
          if not hold[3] then xd[#xd + 1] = id end
        end
      end
    end
    if s and s.sweep then
      local all = redis.call('HGETALL', K(i, 2))
      for x = 1, #all, 2 do
        local id = all[x]
        if id ~= '_' and not seen[id] then
          local hold = HOLD(all[x + 1])
          if not hold[3] then due = due or legacyDue(K(i, 3)) end
          if isExpired(id, hold, due) then
            expired(i, hold)
            mk[#mk + 1], del[#del + 1] = id, id
            if not hold[3] then xd[#xd + 1] = id end
          end
        end
      end
    end
    holds[i], read[i], marks[i], dels[i], xdel[i], legacy[i] = hs, rd, mk, del, xd, lg
  end
  -- The settled marks of the ids reserved and not held (pool 1's, this generation and the
  -- last).
  local ask = {}
  for _, id in ipairs(rids) do
    if not holds[1][id] and not done[id] then ask[#ask + 1] = id end
  end
  if #ask > 0 then
    for k = 5, 6 do
      local d = redis.call('HMGET', K(1, k), unpack(ask))
      for x, id in ipairs(ask) do
        if d[x] then done[id] = true end
      end
    end
  end

  local function rolled(s, p)
    if s.period ~= p then
      s.period, s.start, s.rolled = p, now - now % p, true
    elseif now >= s.start + p then
      s.start, s.committed, s.tripped, s.rolled = now - now % p, 0, 0, true
    end
  end

  local function reserve(call, sp)
    if holds[1][call] then return 0 end
    if done[call] then return {'unknown_call', '', 'call ' .. call .. ' was already settled', 0} end
    for i = 1, n do
      local a = sp.a[i]
      for j = 1, 2 do
        local amount = a[j]
        if amount > 0 then
          local pool, lim = name[i], limit[i][j]
          if lim < 0 then
            return {'budget_uninitialised', pool,
                    'pool ' .. pool .. ' has no ' .. DIMS[j] .. ' budget in the store', 0}
          end
          if not st[i] then
            return {'budget_uninitialised', pool, 'pool ' .. pool .. ' is missing from ' ..
                    'the store (never initialised, or flushed): run tollgate pools init', 0}
          end
          local s = st[i][j]
          rolled(s, period[i][j])
          if s.tripped ~= 0 then
            return {'budget_tripped', pool,
                    'pool ' .. pool .. ' was tripped by an overrun this period', 0}
          end
          local used = s.committed + s.held
          if used + amount > lim then
            return {'budget_exhausted', pool,
                    'pool ' .. pool .. ' ' .. DIMS[j] .. ': ' .. I(used) .. ' of ' .. I(lim) ..
                    ' spent or held, ' .. I(amount) .. ' more asked', 0}
          end
        end
      end
    end
    for i = 1, n do
      local hold, s = sp.hold[i], st[i]
      if s then
        if hold[1] > 0 then s[1].held, s[1].moved = s[1].held + hold[1], true end
        if hold[2] > 0 then s[2].held, s[2].moved = s[2].held + hold[2], true end
      end
      holds[i][call] = hold
    end
    return 0
  end

  local function finish(o, call, sp)
    if not holds[1][call] then
      -- A release of a call never held leaves a mark, so that a late reserve is refused.
      if o == 'release' then
        local mk = marks[1]
        mk[#mk + 1] = call
        done[call] = true
      end
      return {'unknown_call', '', 'no hold for call ' .. call, 0}
    end
    local overrun, opool = 0, ''
    for i = 1, n do
      local hold = holds[i][call]
      if hold then
        for j = 1, 2 do
          local held = hold[j]
          if held > 0 then
            local cost = 0
            if o == 'settle' then
              cost = sp.a[i][j]
              if cost < 0 then cost = held end
            end
            local s = st[i]
            if s then
              s = s[j]
              s.held = s.held - held
              s.committed = s.committed + math.min(cost, held)
              if cost > held then s.tripped, s.rolled = 1, true end
              s.moved = true
            end
            if cost > held then
              overrun = overrun + cost - held
              opool = name[i]
            end
          end
        end
        holds[i][call] = nil
      end
      local mk = marks[i]
      mk[#mk + 1] = call
    end
    done[call] = true
    if overrun > 0 then
      return {'ok', opool, 'call ' .. call .. ' cost ' .. I(overrun) .. ' more than was held', overrun}
    end
    return 0
  end

  local out = {}
  local at = first
  for k = 1, m do
    local id, sp = ARGV[at], SPEC(ARGV[at + 1])
    local o = sp.op
    if o == 'reserve' then
      out[k] = reserve(id, sp)
    elseif o == 'settle' or o == 'release' then
      out[k] = finish(o, id, sp)
    else
      out[k] = {'unavailable', '', 'unknown op ' .. tostring(o), 0}
    end
    at = at + 2
  end

  -- Write back what changed, one command per key.
  for i = 1, n do
    local s = st[i]
    local add, del, xd = {}, dels[i], xdel[i]
    local hs, rd, lg = holds[i], read[i], legacy[i]
    for _, id in ipairs(ids) do
      local hold = hs[id]
      if hold then
        if not rd[id] then
          add[#add + 1] = id
          add[#add + 1] = hold[4]
        end
      elseif rd[id] then
        del[#del + 1] = id
        if lg[id] then xd[#xd + 1] = id end
      end
    end
    if #add > 0 then redis.call('HSET', K(i, 2), unpack(add)) end
    if #del > 0 then redis.call('HDEL', K(i, 2), unpack(del)) end
    if #xd > 0 then redis.call('ZREM', K(i, 3), unpack(xd)) end
    if s then
      local args = {}
      if #marks[i] > 0 or s.unmarked then
        args[1] = 'marks'
        args[2] = I(remember(i, marks[i], s.marks))
      end
      for j = 1, 2 do
        local sj, dim = s[j], DIMS[j]
        if sj.rolled then
          args[#args + 1] = dim .. ':period'
          args[#args + 1] = I(sj.period)
          args[#args + 1] = dim .. ':start'
          args[#args + 1] = I(sj.start)
          args[#args + 1] = dim .. ':tripped'
          args[#args + 1] = I(sj.tripped)
        end
        if sj.moved or sj.rolled then
          args[#args + 1] = dim .. ':committed'
          args[#args + 1] = I(sj.committed)
          args[#args + 1] = dim .. ':held'
          args[#args + 1] = I(sj.held)
        end
      end
      if s.sweep then
        args[#args + 1] = 'swept'
        args[#args + 1] = I(now)
      end
      if #args > 0 then redis.call('HSET', K(i, 1), unpack(args)) end
    else
      remember(i, marks[i], 0)
    end
  end
  return out
end

return redis.error_reply('tollgate budget script: unknown op ' .. tostring(op))
)LUA");
  return script;
}

// Cascade quarantines shared by every sidecar: a sorted set of agent globs by the end of
// their quarantine (Redis time, ms), and a message on kSignals for the sidecars running.
// ARGV: op ("share" glob ttl-ms | "list").
const RedisScript& signalScript() {
  static const RedisScript script(R"LUA(
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if ARGV[1] == 'share' then
  local ttl = tonumber(ARGV[3])
  redis.call('ZADD', KEYS[1], 'GT', now + ttl, ARGV[2])
  redis.call('PUBLISH', ARGV[4], 'quarantine ' .. string.format('%d', ttl) .. ' ' .. ARGV[2])
  return 1
end
local out = {}
local v = redis.call('ZRANGEBYSCORE', KEYS[1], now + 1, '+inf', 'WITHSCORES')
for i = 1, #v, 2 do out[#out + 1] = {v[i], tonumber(v[i + 1]) - now} end
return out
)LUA");
  return script;
}

constexpr const char* kQuarantineKey = "tollgate:{signals}:quarantine";
constexpr const char* kSignals = "tollgate:signals";
constexpr int64_t kResubscribeMs = 500;

BudgetStatus statusOf(std::string_view s) {
  if (s == "ok") return BudgetStatus::kOk;
  if (s == "budget_exhausted") return BudgetStatus::kExhausted;
  if (s == "budget_tripped") return BudgetStatus::kTripped;
  if (s == "budget_uninitialised") return BudgetStatus::kUninitialised;
  if (s == "unknown_call") return BudgetStatus::kUnknownCall;
  return BudgetStatus::kUnavailable;
}

// A pool's keys, in the script's order: budgets, holds, legacy expiries, legacy settled ids,
// settled ids (this generation, the last).
constexpr char kPoolKeys[] = {'b', 'h', 'x', 'd', 'm', 'n'};

std::string keyOf(const std::string& pool, char kind) {
  return "tollgate:{" + pool + "}:" + kind;
}

BudgetOutcome unavailable(std::string reason) {
  return BudgetOutcome{BudgetStatus::kUnavailable, "", std::move(reason), 0};
}

}  // namespace

// The one subscription of the process to kSignals, on the first worker's loop; it
// reconnects every 500 ms while it cannot, and reads the quarantines in force each time it
// (re)subscribes, so that none is missed while it was away.
struct RedisBudgetStore::Subscriber {
  RedisBudgetStore* store;
  uv_loop_t* loop;
  RedisClient* client;  // the same loop's client, for the snapshot
  redisAsyncContext* ac = nullptr;
  uv_timer_t* timer = nullptr;
  size_t seed = 0;
  bool closing = false;

  void start() {
    timer = new uv_timer_t;
    uv_timer_init(loop, timer);
    timer->data = this;
    connect();
  }
  void retry() {
    if (closing) return;
    uv_timer_start(
        timer, [](uv_timer_t* t) { static_cast<Subscriber*>(t->data)->connect(); }, kResubscribeMs,
        0);
  }
  void connect() {
    const auto& seeds = store->options_.seeds;
    const auto& where = seeds[seed++ % seeds.size()];
    ac = redisAsyncConnect(where.host.c_str(), where.port);
    if (!ac || ac->err || redisLibuvAttach(ac, loop) != REDIS_OK) {
      if (ac) redisAsyncFree(ac);
      ac = nullptr;
      retry();
      return;
    }
    ac->data = this;
    redisAsyncSetConnectCallback(ac, [](const redisAsyncContext* c, int status) {
      auto* self = static_cast<Subscriber*>(c->data);
      if (status != REDIS_OK && self->ac == c) {
        self->ac = nullptr;  // hiredis frees it
        self->retry();
      }
    });
    redisAsyncSetDisconnectCallback(ac, [](const redisAsyncContext* c, int) {
      auto* self = static_cast<Subscriber*>(c->data);
      if (self->ac != c) return;
      self->ac = nullptr;
      self->retry();
    });
    redisAsyncCommand(ac, onMessage, this, "SUBSCRIBE %s", kSignals);
  }
  static void onMessage(redisAsyncContext*, void* raw, void* privdata) {
    auto* self = static_cast<Subscriber*>(privdata);
    auto* r = static_cast<redisReply*>(raw);
    if (!r || self->closing || r->type != REDIS_REPLY_ARRAY || r->elements < 3) return;
    std::string_view kind(r->element[0]->str ? r->element[0]->str : "");
    if (kind == "subscribe") {
      self->snapshot();
      return;
    }
    if (kind != "message" || !r->element[2]->str) return;
    // "quarantine TTL_MS GLOB"
    std::string_view msg(r->element[2]->str, r->element[2]->len);
    if (!msg.starts_with("quarantine ")) return;
    msg.remove_prefix(11);
    auto sp = msg.find(' ');
    if (sp == std::string_view::npos) return;
    int64_t ttl = 0;
    auto [end, ec] = std::from_chars(msg.data(), msg.data() + sp, ttl);
    if (ec != std::errc() || ttl <= 0) return;
    if (self->store->onSharedQuarantine)
      self->store->onSharedQuarantine(std::string(msg.substr(sp + 1)),
                                      std::chrono::milliseconds(ttl));
  }
  void snapshot() {
    client->eval(signalScript(), {kQuarantineKey}, {"list"}, [this](Result<RedisReply> r) {
      if (closing || !r || r.value().type != RedisReply::Type::kArray) return;
      for (const auto& e : r.value().elements) {
        if (e.elements.size() == 2 && e.elements[1].integer > 0 && store->onSharedQuarantine)
          store->onSharedQuarantine(e.elements[0].str,
                                    std::chrono::milliseconds(e.elements[1].integer));
      }
    });
  }
  void close(std::function<void()> done) {
    closing = true;
    if (auto* c = ac) {
      ac = nullptr;
      redisAsyncFree(c);
    }
    struct Closing {
      Subscriber* self;
      std::function<void()> done;
    };
    timer->data = new Closing{this, std::move(done)};
    uv_close(reinterpret_cast<uv_handle_t*>(timer), [](uv_handle_t* h) {
      auto* c = static_cast<Closing*>(h->data);
      delete reinterpret_cast<uv_timer_t*>(h);
      auto fn = std::move(c->done);
      delete c->self;
      delete c;
      fn();
    });
  }
};

// Operations on the same pools in one loop turn, sent as one script call.
struct RedisBudgetStore::BatchOp {
  const char* op;  // reserve, settle or release
  uint64_t started;
  Done done;
  std::string callId;  // for a retry, when the store does not answer
  std::vector<Charge> charges;
};

struct RedisBudgetStore::Batch {
  std::vector<std::string> keys;
  std::vector<std::string> args;
  std::vector<BatchOp> ops;
};

struct RedisBudgetStore::PerLoop {
  RedisBudgetStore* store;
  uv_loop_t* loop;
  std::unique_ptr<RedisClient> client;
  std::vector<Retry> retries;
  bool flushing = false;
  Subscriber* subscriber = nullptr;
  std::map<std::string, Batch> batches;  // by the pools charged
  uv_check_t* check = nullptr;
  uv_idle_t* idle = nullptr;
  uv_timer_t* retryTimer = nullptr;   // undelivered settlements are retried on it, traffic or not
  uv_timer_t* settleTimer = nullptr;  // sends settlements that no reserve took along
  bool armed = false;
  std::map<std::string, size_t> inFlight;  // batch scripts sent and not answered, by pools
};

namespace {
// The calling worker's client. One Redis store per process, so one slot per thread.
thread_local void* tlsPerLoop = nullptr;
thread_local const void* tlsOwner = nullptr;
}  // namespace

RedisBudgetStore::PerLoop* RedisBudgetStore::local() const {
  return tlsOwner == this ? static_cast<PerLoop*>(tlsPerLoop) : nullptr;
}

Result<std::vector<RedisBudgetStore::PoolSpec>> RedisBudgetStore::specsOf(const PolicySet& set) {
  auto plain = [](const std::string& name) {
    return !name.empty() && name.size() <= 128 && std::all_of(name.begin(), name.end(), [](char c) {
      return std::isalnum(static_cast<unsigned char>(c)) || c == '_' || c == '.' || c == ':' ||
             c == '-';
    });
  };
  std::vector<PoolSpec> out;
  for (const auto& p : set.pools()) {
    if (!plain(p.name)) {
      return Error{-1, p.mark.str() + ": pool '" + p.name +
                           "': the Redis store needs pool names of letters, digits and _ . : -"};
    }
    PoolSpec s;
    s.name = p.name;
    if (p.effort) s.effortLimit = p.effort->limit, s.effortPeriodMs = p.effort->period.count();
    if (p.risk) s.riskLimit = p.risk->limit, s.riskPeriodMs = p.risk->period.count();
    s.failOpen = p.failOpen;
    s.slot = redisKeySlot(keyOf(p.name, 'b'));
    out.push_back(std::move(s));
  }
  return out;
}

Result<std::unique_ptr<RedisBudgetStore>> RedisBudgetStore::create(const PolicySet& set,
                                                                   Options options) {
  if (options.seeds.empty()) return Error{-1, "store.urls: at least one Redis URL is needed"};
  std::unique_ptr<RedisBudgetStore> store(new RedisBudgetStore(options));
  if (auto st = store->declare(set); !st) return st.error();
  if (options.initMissing) {
    auto created = initPools(set, options, false);
    if (!created) return created.error();
    for (const auto& r : created.value()) {
      if (r.created) Log::Line(LogLevel::kWarn, "pool initialised").add("pool", r.pool).emit();
    }
  }
  return store;
}

RedisBudgetStore::~RedisBudgetStore() {
  if (tlsOwner == this) tlsOwner = nullptr;
}

Status RedisBudgetStore::declare(const PolicySet& set) {
  auto specs = specsOf(set);
  if (!specs) return specs.error();
  std::lock_guard<std::mutex> lock(mutex_);
  specs_ = std::make_shared<const std::vector<PoolSpec>>(std::move(specs.value()));
  return Status::success();
}

std::shared_ptr<const std::vector<RedisBudgetStore::PoolSpec>> RedisBudgetStore::specs() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return specs_;
}

void RedisBudgetStore::attach(uv_loop_t* loop) {
  auto* l = new PerLoop{};
  l->store = this;
  l->loop = loop;
  l->client =
      std::make_unique<RedisClient>(loop, RedisClient::Options{options_.seeds, options_.timeout});
  l->check = new uv_check_t;
  uv_check_init(loop, l->check);
  l->check->data = l;
  l->idle = new uv_idle_t;
  uv_idle_init(loop, l->idle);
  l->retryTimer = new uv_timer_t;
  uv_timer_init(loop, l->retryTimer);
  l->retryTimer->data = l;
  uv_unref(reinterpret_cast<uv_handle_t*>(l->retryTimer));
  l->settleTimer = new uv_timer_t;
  uv_timer_init(loop, l->settleTimer);
  l->settleTimer->data = l;
  tlsPerLoop = l;
  tlsOwner = this;
  if (!subscribed_.exchange(true)) {
    l->subscriber = new Subscriber{this, loop, l->client.get()};
    l->subscriber->start();
  }
}

void RedisBudgetStore::shareQuarantine(const std::string& glob, std::chrono::milliseconds ttl) {
  PerLoop* l = local();
  if (!l) return;
  l->client->eval(signalScript(), {kQuarantineKey},
                  {"share", glob, std::to_string(ttl.count()), kSignals},
                  [glob](Result<RedisReply> r) {
                    if (!r || r.value().isError()) {
                      Log::Line(LogLevel::kWarn, "cascade quarantine not shared")
                          .add("agents", glob)
                          .add("error", r ? r.value().str : r.error().message)
                          .emit();
                    }
                  });
}

void RedisBudgetStore::detach(std::function<void()> done) {
  PerLoop* l = local();
  tlsPerLoop = nullptr;
  tlsOwner = nullptr;
  if (!l) {
    done();
    return;
  }
  if (!l->retries.empty()) {
    Log::Line(LogLevel::kWarn, "budget settlements not delivered at shutdown; their holds expire")
        .add("calls", static_cast<uint64_t>(l->retries.size()))
        .emit();
  }
  // What waits for this turn's batch goes now; then settlements still on the wire are
  // waited for (each within its deadline).
  flush(l, true);
  uv_close(reinterpret_cast<uv_handle_t*>(l->check),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_check_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(l->idle),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_idle_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(l->settleTimer),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  uv_close(reinterpret_cast<uv_handle_t*>(l->retryTimer),
           [](uv_handle_t* h) { delete reinterpret_cast<uv_timer_t*>(h); });
  auto closeClient = [l, done = std::move(done)] {
    l->client->close(
        [l, done] {
          delete l;
          done();
        },
        true);
  };
  if (l->subscriber) {
    l->subscriber->close(std::move(closeClient));
    l->subscriber = nullptr;
  } else {
    closeClient();
  }
}

void RedisBudgetStore::retryLater(PerLoop* l, Retry retry) {
  if (l->retries.size() >= kMaxRetries) return;  // the hold expires and is committed
  l->retries.push_back(std::move(retry));
  // Retried with the next answered batch, or after a moment when no traffic follows (a
  // settlement must not wait for the next call, or its hold would commit the estimate).
  if (!uv_is_active(reinterpret_cast<uv_handle_t*>(l->retryTimer))) {
    uv_timer_start(
        l->retryTimer,
        [](uv_timer_t* t) {
          auto* pl = static_cast<PerLoop*>(t->data);
          pl->store->flushRetries(pl);
        },
        kRetryDelayMs, 0);
  }
}

void RedisBudgetStore::flushRetries(PerLoop* l) {
  if (l->retries.empty() || l->flushing) return;
  l->flushing = true;
  auto retries = std::move(l->retries);
  l->retries.clear();
  for (auto& r : retries) {
    if (r.settle)
      settle(r.callId, r.charges, [](BudgetOutcome) {});
    else
      release(r.callId, r.charges, [](BudgetOutcome) {});
  }
  l->flushing = false;
}

void RedisBudgetStore::run(const char* op, const std::string& callId,
                           const std::vector<Charge>& charges, int64_t ttlMs, Done done) {
  PerLoop* l = local();
  if (!l) {
    done(unavailable("no Redis connection on this thread"));
    return;
  }
  auto specs = this->specs();
  // One batch per pool list and loop turn, reserves and settlements together: separate
  // batches cost Redis a script call each and measured no faster reserve.
  std::string batchKey;
  std::vector<const PoolSpec*> pools;
  // An operation is its call id and its spec, 'OP TTL' and per pool the two amounts: the
  // script parses each distinct spec once per batch.
  char buf[64];
  auto number = [&buf](int64_t v) {
    buf[0] = ' ';
    return std::string_view(buf,
                            static_cast<size_t>(std::to_chars(buf + 1, buf + 21, v).ptr - buf));
  };
  std::string spec = op;
  spec += number(ttlMs);
  uint16_t slot = 0;
  for (size_t i = 0; i < charges.size(); ++i) {
    const auto& c = charges[i];
    const PoolSpec* pool = nullptr;
    for (const auto& sp : *specs) {
      if (sp.name == c.pool) pool = &sp;
    }
    if (!pool) {
      done(BudgetOutcome{BudgetStatus::kUninitialised, c.pool,
                         "pool " + c.pool + " is not in the policy set", 0});
      return;
    }
    if (i == 0) slot = pool->slot;
    if (pool->slot != slot) {
      done(unavailable("pools " + charges[0].pool + " and " + c.pool +
                       " are in different Redis slots; a call charges pools of one hash tag"));
      return;
    }
    batchKey += c.pool;
    batchKey += '\n';
    pools.push_back(pool);
    spec += number(c.effort);
    spec += number(c.risk);
  }
  // Operations on the same pools wait for the end of this loop turn and go as one script.
  auto& batch = l->batches[batchKey];
  if (batch.ops.empty()) {
    batch.keys.clear();
    batch.args.clear();
    for (const PoolSpec* p : pools) {
      for (char k : kPoolKeys) batch.keys.push_back(keyOf(p->name, k));
      for (std::string v :
           {p->name, std::to_string(p->effortLimit), std::to_string(p->effortPeriodMs),
            std::to_string(p->riskLimit), std::to_string(p->riskPeriodMs)})
        batch.args.push_back(std::move(v));
    }
  }
  batch.args.push_back(callId);
  batch.args.push_back(std::move(spec));
  batch.ops.push_back({op, uv_hrtime(), std::move(done), callId, charges});
  if (batch.ops.size() >= kMaxBatch) {
    // Large enough: it goes now (a script's arguments are bounded).
    auto full = std::move(batch);
    l->batches.erase(batchKey);
    send(l, batchKey, std::move(full));
    return;
  }
  // Nothing waits for a settle or release: it goes with the next reserve on its pools, or after
  // kSettleDelayMs when none comes, so that a call costs Redis one script call, not two,
  // when each loop turn sees few calls. Its hold stays counted until then.
  if (std::string_view(op) != "reserve") {
    if (!l->armed && !uv_is_active(reinterpret_cast<uv_handle_t*>(l->settleTimer))) {
      uv_timer_start(
          l->settleTimer,
          [](uv_timer_t* t) {
            auto* pl = static_cast<PerLoop*>(t->data);
            pl->store->flush(pl);
          },
          kSettleDelayMs, 0);
    }
    return;
  }
  if (!l->armed) {
    l->armed = true;
    uv_check_start(l->check, [](uv_check_t* h) {
      auto* pl = static_cast<PerLoop*>(h->data);
      pl->store->flush(pl);
    });
    // An idle handle keeps the loop from blocking in poll while a batch waits.
    uv_idle_start(l->idle, [](uv_idle_t*) {});
  }
}

void RedisBudgetStore::flush(PerLoop* l, bool force, bool write) {
  uv_timer_stop(l->settleTimer);
  uv_check_stop(l->check);
  uv_idle_stop(l->idle);
  l->armed = false;
  // While kMaxInFlight scripts of the same pools are on the wire, their next batch grows
  // until one is answered: a script's fixed cost in Redis (its call, the budget's read and
  // write, Lua's tables) is then shared by more operations when Redis is busy, and nothing
  // waits when it is not. Redis runs one connection's commands in order, so a third script
  // sent at once would wait behind the two anyway; with two out, one runs while the next
  // is queued, and the batch goes when the first is answered.
  bool sent = false;
  for (auto it = l->batches.begin(); it != l->batches.end();) {
    if (auto f = l->inFlight.find(it->first);
        !force && f != l->inFlight.end() && f->second >= kMaxInFlight) {
      ++it;
      continue;
    }
    Batch batch = std::move(it->second);
    std::string key = it->first;
    it = l->batches.erase(it);
    send(l, key, std::move(batch));
    sent = true;
  }
  if (sent && write) l->client->flushWrites();
}

void RedisBudgetStore::send(PerLoop* l, const std::string& key, Batch batch) {
  // A reserve's latency counts from its call (the wait for a batch is the call's wait too);
  // a settle's or release's from here: nothing waited for it until now.
  uint64_t now = uv_hrtime();
  for (auto& op : batch.ops) {
    if (std::string_view(op.op) != "reserve") op.started = now;
  }
  std::vector<std::string> args;
  args.reserve(batch.args.size() + 2);
  args.push_back("batch");
  args.push_back(std::to_string(batch.ops.size()));
  for (auto& a : batch.args) args.push_back(std::move(a));
  ++l->inFlight[key];
  l->client->eval(budgetScript(), std::move(batch.keys), std::move(args),
                  [this, l, key, ops = std::move(batch.ops)](Result<RedisReply> r) mutable {
                    answer(l, key, ops, r);
                  });
}

void RedisBudgetStore::answer(PerLoop* l, const std::string& key, std::vector<BatchOp>& ops,
                              const Result<RedisReply>& r) {
  if (auto it = l->inFlight.find(key); it != l->inFlight.end() && --it->second == 0)
    l->inFlight.erase(it);
  std::string failure;
  if (!r)
    failure = r.error().message;
  else if (r.value().isError())
    failure = "redis: " + r.value().str;
  else if (r.value().type != RedisReply::Type::kArray || r.value().elements.size() != ops.size())
    failure = "redis: unexpected reply to the budget script";
  bool answered = false;
  for (size_t i = 0; i < ops.size(); ++i) {
    BudgetOutcome out;
    if (!failure.empty()) {
      out = unavailable(failure);
    } else if (r.value().elements[i].type == RedisReply::Type::kInteger) {
      out.status = BudgetStatus::kOk;  // the common answer, sent as 0
    } else {
      const auto& e = r.value().elements[i].elements;
      if (e.size() != 4) {
        out = unavailable("redis: unexpected reply to the budget script");
      } else {
        out.status = statusOf(e[0].str);
        out.pool = e[1].str;
        out.reason = e[2].str;
        out.overrun = e[3].integer;
      }
    }
    answered |= out.status != BudgetStatus::kUnavailable;
    if (out.status == BudgetStatus::kUnavailable) {
      // A settle or release is sent again when the store answers; a reserve's call is
      // halted, and its hold (if the reserve did reach Redis) is released then.
      if (PerLoop* pl = local()) {
        bool settle = std::string_view(ops[i].op) == "settle";
        retryLater(pl, Retry{settle, std::move(ops[i].callId), std::move(ops[i].charges)});
      }
    }
    if (observer)
      observer(ops[i].op, out.status, static_cast<double>(uv_hrtime() - ops[i].started) / 1e9);
    ops[i].done(std::move(out));
  }
  if (answered) flushRetries(l);
  // Operations that waited for this answer go now (written by the client at the end of this
  // turn: this runs inside hiredis's reply processing).
  if (local() == l && l->batches.count(key)) flush(l, false, false);
}

void RedisBudgetStore::reserve(const std::string& callId, const std::vector<Charge>& charges,
                               std::chrono::milliseconds holdTtl, Done done) {
  run("reserve", callId, charges, holdTtl.count(), std::move(done));
}

void RedisBudgetStore::settle(const std::string& callId, const std::vector<Charge>& actual,
                              Done done) {
  std::vector<Charge> charges = actual;
  for (auto& c : charges) {
    c.effort = std::max<int64_t>(c.effort, -1);  // -1: what was held
    c.risk = std::max<int64_t>(c.risk, -1);
  }
  run("settle", callId, charges, 0, std::move(done));
}

void RedisBudgetStore::release(const std::string& callId, const std::vector<Charge>& charges,
                               Done done) {
  run("release", callId, charges, 0, std::move(done));
}

std::pair<std::vector<std::string>, std::vector<std::string>> RedisBudgetStore::poolCall(
    const char* op, const char* mode, const PoolSpec& s) {
  std::vector<std::string> keys;
  for (char k : kPoolKeys) keys.push_back(keyOf(s.name, k));
  std::vector<std::string> args{op,
                                mode,
                                "0",
                                "1",
                                s.name,
                                "0",
                                "0",
                                std::to_string(s.effortLimit),
                                std::to_string(s.effortPeriodMs),
                                std::to_string(s.riskLimit),
                                std::to_string(s.riskPeriodMs)};
  return {std::move(keys), std::move(args)};
}

std::vector<BudgetView> RedisBudgetStore::view() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return cache_;
}

void RedisBudgetStore::refresh(std::function<void()> done) {
  PerLoop* l = local();
  auto specs = this->specs();
  if (!l || specs->empty()) {
    done();
    return;
  }
  // One script call per pool: pools are in different slots.
  struct Gather {
    std::vector<BudgetView> views;
    size_t left;
    std::function<void()> done;
  };
  auto g = std::make_shared<Gather>(Gather{{}, specs->size(), std::move(done)});
  for (const auto& s : *specs) {
    auto [keys, args] = poolCall("view", "", s);
    l->client->eval(
        budgetScript(), std::move(keys), std::move(args), [this, g, s](Result<RedisReply> r) {
          bool ok = r && r.value().type == RedisReply::Type::kArray;
          for (const char* dim : {"effort", "risk"}) {
            int64_t limit = std::string_view(dim) == "effort" ? s.effortLimit : s.riskLimit;
            if (limit < 0) continue;
            BudgetView v{s.name, dim, limit, 0, 0, 0, false};
            v.initialised = false;
            v.available = false;
            if (ok) {
              for (const auto& e : r.value().elements) {
                if (e.elements.size() != 7 || e.elements[1].str != dim) continue;
                v.available = true;
                v.initialised = e.elements[2].integer == 1;
                v.committed = e.elements[3].integer;
                v.held = e.elements[4].integer;
                v.periodEndMs = e.elements[5].integer;
                v.tripped = e.elements[6].integer != 0;
              }
            }
            g->views.push_back(std::move(v));
          }
          if (--g->left == 0) {
            std::sort(g->views.begin(), g->views.end(), [](const auto& a, const auto& b) {
              return std::tie(a.pool, a.dimension) < std::tie(b.pool, b.dimension);
            });
            {
              std::lock_guard<std::mutex> lock(mutex_);
              cache_ = g->views;
            }
            g->done();
          }
        });
  }
}

Result<std::vector<RedisBudgetStore::InitResult>> RedisBudgetStore::initPools(
    const PolicySet& set, const Options& options, bool reset) {
  auto specs = specsOf(set);
  if (!specs) return specs.error();
  uv_loop_t loop;
  uv_loop_init(&loop);
  std::vector<InitResult> out;
  std::string failure;
  {
    RedisClient client(
        &loop, RedisClient::Options{options.seeds,
                                    std::max(options.timeout, std::chrono::milliseconds(2000))});
    for (const auto& s : specs.value()) {
      auto [keys, args] = poolCall("init", reset ? "reset" : "missing", s);
      bool answered = false;
      client.eval(budgetScript(), std::move(keys), std::move(args),
                  [&, name = s.name](Result<RedisReply> r) {
                    answered = true;
                    if (!r) {
                      if (failure.empty()) failure = r.error().message;
                    } else if (r.value().isError() || r.value().elements.size() != 1) {
                      if (failure.empty()) failure = "redis: " + r.value().str;
                    } else {
                      out.push_back({name, r.value().elements[0].str == "created"});
                    }
                  });
      while (!answered) uv_run(&loop, UV_RUN_ONCE);  // one at a time; every request has a deadline
    }
    client.close(nullptr);
    uv_run(&loop, UV_RUN_DEFAULT);
  }
  uv_loop_close(&loop);
  if (!failure.empty()) return Error{-1, "pools init: " + failure};
  return out;
}

}  // namespace tollgate
